"""tools/inspect_checkpoint.py reports step, layout, tensors and loadable layouts."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(300)
def test_inspect_reports_tensors_and_layouts(cli, tmp_path):
    out = cli("train", "--config", "configs/quickstart.yaml", "--set", "parallel.world_size=2",
              "--set", "parallel.tensor=1", "--set", "parallel.expert=2", "--set", "train.steps=1",
              "--set", "train.warmup_steps=0", "--set", "train.eval_iters=0",
              "--set", f"run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    res = subprocess.run([sys.executable, "tools/inspect_checkpoint.py", str(tmp_path), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info["meta"]["step"] == 1 and info["meta"]["world_size"] == 2
    keys = {t["key"]: t["shape"] for t in info["tensors"]}
    assert keys["decoder.layers.mlp.router.weight"] == [4, 4, 64]
    assert any(k.startswith("optimizer.exp_avg.") for k in keys)
    layouts = {(c["world"], c["TP"], c["PP"], c["EP"]) for c in info["loadable"]}
    assert {(1, 1, 1, 1), (4, 1, 1, 4), (4, 2, 1, 2)} <= layouts
    assert (2, 1, 1, 3) not in layouts      # 4 experts do not split over EP3
    bad = subprocess.run([sys.executable, "tools/inspect_checkpoint.py", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no such checkpoint directory" in bad.stderr
