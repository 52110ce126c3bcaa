"""tools/bench_moe.py: both layers side by side, one JSON line of figures, and an output check
that fails when the weights differ (negative control)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["--hidden", "32", "--ffn", "64", "--experts", "4", "--topk", "2", "--seq", "16",
        "--batch", "2", "--iters", "3", "--warmup", "1"]


def _bench(*extra):
    return subprocess.run([sys.executable, "tools/bench_moe.py", *TINY, *extra], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1", MEGAMOE_DEVICE="cpu"))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("extra", [[], ["--world-size", "2", "--expert-parallel", "2"]],
                         ids=["1rank", "2ranks-ep2"])
def test_bench_prints_ratios_as_json(extra):
    out = _bench(*extra)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["bench"] == "moe_layer"
    assert set(figures["ratios"]) == {"alltoall", "allgather"}
    assert figures["ratio"] == max(figures["ratios"].values()) > 0
    assert figures["tokens"] == 32 and figures["world_size"] == (2 if extra else 1)
    assert all(d <= 1e-5 for d in figures["max_abs_diff"].values()), figures


@pytest.mark.timeout(180)
def test_bench_fails_when_weights_differ():
    out = _bench("--perturb", "0.5", "--dispatchers", "alltoall", "--iters", "1")
    assert out.returncode != 0
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["max_abs_diff"]["alltoall"] > 1e-3, figures
    assert "differ beyond" in out.stderr
