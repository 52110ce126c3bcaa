#!/usr/bin/env bash
# README command two: install, then run the test suite (unit, distributed gloo, e2e; GPU tests
# are skipped without CUDA). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
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
