#!/usr/bin/env bash
# README command one: install, then train the multimodal quickstart MoE on CPU with 2 gloo ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec .venv/bin/megamoe train --config configs/quickstart.yaml "$@"
