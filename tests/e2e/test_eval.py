"""`megamoe eval RUN`: the newest checkpoint of a run trained under EP2, evaluated on one
process, gives the validation loss the run itself logged at its last step (same batches, any
layout), with its perplexity, as the last stdout line in JSON. A run without a complete
checkpoint and a bad --iters are one clear error."""

import json
import math
import os
import shutil

import pytest


@pytest.mark.timeout(600)
def test_eval_matches_the_runs_own_validation_loss(cli, trained_run):
    out = cli("eval", str(trained_run))
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    with open(trained_run / "summary.json") as f:
        summary = json.load(f)
    assert figures["step"] == summary["steps"] and figures["family"] == "lm"
    assert figures["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    assert figures["perplexity"] == pytest.approx(math.exp(summary["val_loss"]), rel=1e-5)
    assert "eval batch 1/1" in out.stderr and "tokens/s" in out.stderr


@pytest.mark.timeout(600)
def test_eval_bad_input_is_one_clear_error(cli, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for name in os.listdir(run / "checkpoints"):
        if name.startswith("step_"):
            os.remove(run / "checkpoints" / name / "meta.json")   # every save unfinished
    out = cli("eval", str(run))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"megamoe: error: {run}")
    assert "no complete checkpoint" in out.stderr
    out = cli("eval", str(trained_run), "--iters", "0")
    assert out.returncode == 2 and "--iters=0: must be ≥ 1" in out.stderr
