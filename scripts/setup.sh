#!/usr/bin/env bash
# Create .venv and install megamoe with what it needs (idempotent).
# torch: the CPU wheel torch==2.13.0 when no torch is installed yet (GPU users bring their own).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${MEGAMOE_EXTRAS:-test,hf,deepspeed,diffusion,data}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# deepspeed (train.engine=deepspeed): pure Python, no ops compiled at install
export DS_BUILD_OPS=${DS_BUILD_OPS:-0}
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/pip install -q "torch==2.13.0" 2>&1 | grep -v -i "^warning" || true
fi
.venv/bin/pip install -q -e ".[${EXTRAS}]" 2>&1 | grep -v -i "warning" || true
.venv/bin/python -c "import megamoe, megatron.core, torch; print('megamoe', megamoe.__version__, '| torch', torch.__version__, '| megatron-core', megatron.core.__version__)"
