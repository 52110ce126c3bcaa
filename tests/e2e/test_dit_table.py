"""tools/dit_table.py with tiny settings (a real table is the integrator's run): it trains the
DiT-MoE recipe and a judge for 2 steps on one rank, evaluates the run with `megamoe eval --judge`
(an explicit --min-judge-accuracy 0: an untrained judge is otherwise refused), prints the table
and a JSON line; a second call reads the runs
and the saved evaluation back instead of redoing them."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = ["parallel.world_size=1", "parallel.expert=1", "train.warmup_steps=1",
        "train.eval_interval=0", "train.eval_iters=1", "train.global_batch_size=8",
        "train.micro_batch_size=8", "run.tensorboard=false", "run.progress=false",
        "model.num_layers=2"]


def _tool(runs):
    args = ["--runs-dir", str(runs), "--only", "dit_dit_moe", "--steps", "2",
            "--judge-steps", "2", "--samples", "16", "--eval-steps", "3",
            "--min-judge-accuracy", "0", "--judge-set", "model.moe.layer_freq=[0,0]"]
    for o in TINY:
        args += ["--set", o, "--judge-set", o]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "tools/dit_table.py", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_dit_table_trains_evaluates_and_reads_back(tmp_path):
    out = _tool(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    table = json.loads(out.stdout.strip().splitlines()[-1])
    assert table["missing"] == [] and table["steps"] == 2
    assert table["images_per_step"] == 8 and "2 steps of 8 images each" in out.stdout
    (row,) = table["rows"]
    assert row["recipe"] == "dit_dit_moe" and row["step"] == 2 and row["router"] == "dit_moe"
    assert len(row["loss_by_t"]) == 8 and all(v > 0 for v in row["loss_by_t"])
    assert 0 <= row["sample_accuracy"] <= 1 and math.isfinite(row["fid"])
    assert "DiT-MoE" in out.stdout and "training 2 steps" in out.stderr
    with open(tmp_path / "dit_dit_moe" / "eval" / "dit_table.json") as f:
        figures = json.load(f)["figures"]
    assert figures["feature_dims"] == 96 and figures["judge_accuracy"] < 0.9
    assert os.path.isfile(figures["expert_load_png"])
    load = figures["expert_load_by_t"]
    assert load["layers"] == [1, 2] and len(load["t"]) == 3
    assert all(abs(sum(row) - 1) < 1e-3 for step in load["share"] for row in step)
    again = _tool(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "training" not in again.stderr and "evaluating" not in again.stderr, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["rows"] == table["rows"]
