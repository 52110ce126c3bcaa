#!/usr/bin/env bash
# The GPU checks of issue 14 as one prepared run (about 5-8 minutes on one H200; budget 10):
#   1. tests/gpu (one-GPU training smoke test, FP8 back ends on CUDA against the CPU emulation),
#   2. tools/bench_fp8.py --device cuda at the Mixtral proxy layer (hidden 4096, FFN 14336,
#      8 experts, top-2, 4096 tokens; forced balance for the expert GEMMs) and the large shape:
#      fp32/bf16 sequential and grouped experts, FP8 per recipe and `fp8 rowwise grouped`
#      (torch._scaled_grouped_mm). Its figures fill megamoe/moe/experts/choice.py's CUDA entry
#      (bf16 grouped vs sequential) and the issue's goals (FP8 experts >= 1.5x bf16, FP8 layer
#      >= 1.2x bf16).
# Everything goes to $OUT (default ./gpu_out): pytest.log, bench_fp8_cuda.txt, and the bench's
# JSON line as bench_fp8_cuda.json.
#
# The lent machine (an H200; see /work/.library/device/KINDS.md) has python3 with a CUDA torch
# but no Megatron-Core and no network. Prepare once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.16.1
# then run this with `.whl` carried:  bash tests/gpu/run_gpu_checks.sh   (timeout_s 600).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=$PYTHONPATH:/tmp/site
    else
        echo "no megatron-core: prepare .whl as this script's header says" >&2
        exit 1
    fi
fi
nvidia-smi -L | tee "$OUT/device.txt"
"$PY" -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', m.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" || exit 1

rc=0
# 1. the GPU tests (skipped without CUDA; each has its own timeout)
timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/gpu -rs 2>&1 | tee "$OUT/pytest.log" || rc=1

# 2. the benchmark: mixtral last, so that its ratios are the JSON line's
timeout 420 "$PY" tools/bench_fp8.py --device cuda --shapes large,mixtral --iters 20 \
    --warmup 3 2>&1 | grep -v -i "warn" | tee "$OUT/bench_fp8_cuda.txt" || rc=1
tail -n 1 "$OUT/bench_fp8_cuda.txt" > "$OUT/bench_fp8_cuda.json"
exit $rc
