"""tools/bench_moe.py runs both layers side by side and ends with one JSON line of figures."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra", [[], ["--world-size", "2", "--expert-parallel", "2"]])
def test_bench_prints_ratios_as_json(extra):
    out = subprocess.run(
        [sys.executable, "tools/bench_moe.py", "--hidden", "32", "--ffn", "64", "--experts", "4",
         "--seq", "16", "--batch", "2", "--iters", "3", "--warmup", "1", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(figures["ratios"]) == {"alltoall", "allgather"}
    assert figures["ratio"] == max(figures["ratios"].values()) > 0
