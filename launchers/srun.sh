#!/usr/bin/env bash
# Launch megamoe as a Slurm job step inside an allocation (salloc, or an sbatch script): one
# task per rank, direct launch through PMIx so MPI libraries see their ranks too.
#   salloc -N 2 --ntasks-per-node 4 launchers/srun.sh configs/<recipe>.yaml [--set KEY=VALUE ...]
# Rendezvous: MASTER_ADDR is the first host of the step (megamoe reads SLURM_STEP_NODELIST when
# MASTER_ADDR is unset), MASTER_PORT follows the job id. For the whole batch job (health check,
# pre-emption, requeue) use slurm/pretrain.sbatch or `megamoe submit`.
set -euo pipefail
CONFIG=${1:?usage: launchers/srun.sh CONFIG [--set KEY=VALUE ...]}
shift
: "${SLURM_JOB_ID:?launchers/srun.sh runs inside a Slurm allocation (salloc or sbatch)}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
exec srun --mpi=pmix --kill-on-bad-exit=1 "${PYTHON:-python}" -m megamoe train --config "$CONFIG" \
  --set "parallel.world_size=$SLURM_NTASKS" "$@"
