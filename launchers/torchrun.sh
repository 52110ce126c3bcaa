#!/usr/bin/env bash
# Launch megamoe under torchrun on this node: one process per GPU (or NPROC gloo ranks on CPU).
#   launchers/torchrun.sh configs/lm_quickstart.yaml [--set KEY=VALUE ...]
# Multi-node: set NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT as torchrun expects.
set -euo pipefail
CONFIG=${1:?usage: launchers/torchrun.sh CONFIG [--set KEY=VALUE ...]}
shift
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python -c "import torch; print(torch.cuda.device_count() or 0)")
  [ "$NPROC" -gt 0 ] || NPROC=$(python -c "import yaml,sys; print((yaml.safe_load(open(sys.argv[1])) or {}).get('parallel',{}).get('world_size',1))" "$CONFIG")
fi
NNODES=${NNODES:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec torchrun --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$NPROC" \
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}" \
  -m megamoe train --config "$CONFIG" --set "parallel.world_size=$((NPROC * NNODES))" "$@"
