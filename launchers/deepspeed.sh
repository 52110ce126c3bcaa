#!/usr/bin/env bash
# Launch megamoe under DeepSpeed's launcher (`deepspeed`): PER_NODE ranks on each of NODES nodes.
#   launchers/deepspeed.sh configs/lm_quickstart.yaml [--set KEY=VALUE ...]
#   NODES=2 HOSTFILE=hosts DS_LAUNCHER=openmpi launchers/deepspeed.sh configs/<recipe>.yaml
# PER_NODE defaults to the visible GPUs, or on a CPU node to parallel.world_size / NODES gloo
# ranks. The launcher only starts processes: the engine is the config's `train.engine` (add
# `--set train.engine=deepspeed` for ZeRO). Several nodes need DS_LAUNCHER=openmpi (with a
# hostfile) or slurm (inside an allocation): DeepSpeed's default, pdsh, needs ssh between nodes.
# megamoe reads the launcher's rank variables (CROSS_RANK / LOCAL_SIZE, megamoe.launch.env).
set -euo pipefail
CONFIG=${1:?usage: launchers/deepspeed.sh CONFIG [--set KEY=VALUE ...]}
shift
PY=${PYTHON:-python}
NODES=${NODES:-1}
if [ -z "${PER_NODE:-}" ]; then
  PER_NODE=$("$PY" -c "import torch; print(torch.cuda.device_count() or 0)")
  if [ "$PER_NODE" -eq 0 ]; then
    WORLD=$("$PY" -c 'import sys; from megamoe.config import load_config; a = sys.argv[2:]
print(load_config(sys.argv[1], [a[i + 1] for i, x in enumerate(a) if x in ("--set", "-s")]).parallel.world_size)' "$CONFIG" "$@")
    PER_NODE=$((WORLD / NODES))
  fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ARGS=(--num_nodes "$NODES" --num_gpus "$PER_NODE" --no_local_rank
      --master_port "${MASTER_PORT:-29500}")
[ -n "${MASTER_ADDR:-}" ] && ARGS+=(--master_addr "$MASTER_ADDR")
if [ "$NODES" -gt 1 ]; then
  ARGS+=(--launcher "${DS_LAUNCHER:-openmpi}")
  [ -n "${HOSTFILE:-}" ] && ARGS+=(--hostfile "$HOSTFILE")
fi
exec deepspeed "${ARGS[@]}" --module megamoe train --config "$CONFIG" \
  --set "parallel.world_size=$((PER_NODE * NODES))" "$@"
