"""tools/bench_fp8.py at the quickstart's expert shape: every variant timed side by side in one
thread (also where the caller's environment does not ask for one), one JSON line of figures."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = {"fp32 sequential", "fp32 grouped", "bf16 sequential", "bf16 grouped",
            "fp8 tensorwise", "fp8 delayed", "fp8 rowwise", "fp8 blockwise",
            "fp32 dense bound", "bf16 dense bound"}


@pytest.mark.timeout(240)
def test_bench_fp8_prints_every_variant_and_its_ratios_as_json():
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "tools/bench_fp8.py", "--shapes", "quickstart",
                          "--iters", "20", "--warmup", "0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=200, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "fp8_experts" and figures["shape"] == "quickstart"
    assert figures["threads"] == 1, "a rank's share of the CPU: one thread"
    ms = figures["ms"]["quickstart"]
    assert set(ms) == VARIANTS, set(ms) ^ VARIANTS
    for name, m in ms.items():
        assert m["experts"] > 0, name
        assert (m["layer"] is None) == name.endswith("dense bound"), name
    for key in ("grouped_speedup_fp32", "grouped_speedup_bf16", "dense_bound_speedup_fp32",
                "dense_bound_speedup_bf16", "grouped_layer_speedup_fp32"):
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert set(figures["fp8_vs_bf16_experts"]) == {"tensorwise", "delayed", "rowwise",
                                                   "blockwise"}
    # the printed table holds the same figures as the JSON line
    assert f"{ms['fp32 grouped']['experts']:11.2f}" in out.stdout
