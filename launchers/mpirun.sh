#!/usr/bin/env bash
# Launch megamoe under Open MPI's mpirun: NP ranks (default: the config's parallel.world_size),
# on this node or, with a hostfile (HOSTFILE=...) or inside a Slurm allocation, across nodes.
#   launchers/mpirun.sh configs/lm_quickstart.yaml [--set KEY=VALUE ...]
#   NP=16 HOSTFILE=hosts launchers/mpirun.sh configs/<recipe>.yaml
# Rendezvous: without MASTER_ADDR, rank 0 shares its host and a free port through mpi4py
# (pip install 'megamoe[mpi]'); torch's process group does the rest (NCCL on GPUs, gloo on CPU).
set -euo pipefail
CONFIG=${1:?usage: launchers/mpirun.sh CONFIG [--set KEY=VALUE ...]}
shift
PY=${PYTHON:-python}
NP=${NP:-$("$PY" -c 'import sys; from megamoe.config import load_config; a = sys.argv[2:]
print(load_config(sys.argv[1], [a[i + 1] for i, x in enumerate(a) if x in ("--set", "-s")]).parallel.world_size)' "$CONFIG" "$@")}
ARGS=(-np "$NP" -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" -x PYTHONUNBUFFERED=1)
[ -n "${HOSTFILE:-}" ] && ARGS+=(--hostfile "$HOSTFILE")
[ "$(id -u)" = 0 ] && ARGS+=(--allow-run-as-root)
[ "$NP" -gt "$(nproc)" ] && [ -z "${HOSTFILE:-}" ] && [ -z "${SLURM_JOB_ID:-}" ] && ARGS+=(--oversubscribe)
exec mpirun "${ARGS[@]}" "$PY" -m megamoe train --config "$CONFIG" --set "parallel.world_size=$NP" "$@"
