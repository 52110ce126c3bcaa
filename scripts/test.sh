#!/usr/bin/env bash
# README command two: install (and, as root, bring up a local Slurm cluster), then run the test
# suite (unit, distributed gloo, e2e incl. Slurm/mpirun; GPU tests are skipped without CUDA).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
# the local Slurm cluster + OpenMPI of tests/e2e/test_slurm.py (root only; a failure fails here)
if [ "$(uname -s)" = Linux ] && [ "$(id -u)" = 0 ]; then
  bash scripts/slurm_local.sh
else
  echo "no local Slurm cluster (needs root on Linux): tests/e2e/test_slurm.py skips"
fi
MEGAMOE_EXTRAS=${MEGAMOE_EXTRAS:-test,hf,mpi,deepspeed,diffusion,data} bash scripts/setup.sh
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
set +e
.venv/bin/python -m pytest tests -q -ra --durations=20 --timeout=900 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
