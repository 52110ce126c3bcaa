"""The vit recipe from the command line: a short EP2 run of configs/vit_vmoe.yaml (shrunk),
`megamoe eval` reporting its validation accuracy next to chance (equal to the run's own
validation accuracy: same batches, another layout), the V-MoE inference-capacity table, and bad
--capacity / --priority values as one clear error naming the flag."""

import json

import pytest

ARGS = ["--config", "configs/vit_vmoe.yaml", "--set", "train.steps=3",
        "--set", "train.warmup_steps=1", "--set", "train.eval_interval=0",
        "--set", "train.eval_iters=1", "--set", "train.global_batch_size=16",
        "--set", "train.micro_batch_size=4", "--set", "run.tensorboard=false",
        "--set", "model.num_layers=2", "--set", "model.moe.layer_freq=[0,1]"]


@pytest.mark.timeout(600)
def test_vit_train_eval_and_capacity_table(cli, tmp_path):
    run = tmp_path / "run"
    out = cli("train", *ARGS, "--set", f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    with open(run / "summary.json") as f:
        summary = json.load(f)
    out = cli("eval", str(run), "--capacity", "1,0.25", "--priority", "none,max")
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["family"] == "vit" and figures["chance"] == pytest.approx(1 / 12)
    assert figures["accuracy"] == pytest.approx(summary["val_accuracy"], abs=1e-6)
    assert figures["val_loss"] == pytest.approx(summary["val_loss"], rel=1e-5)
    rows = figures["capacity_table"]
    assert [(r["priority"], r["capacity"]) for r in rows] == [
        ("none", 1.0), ("none", 0.25), ("max", 1.0), ("max", 0.25)]
    assert "validation accuracy" in out.stdout and "capacity" in out.stdout
    for flag, value, text in (("--capacity", "0", "--capacity: 0 must be in (0, inf)"),
                              ("--capacity", "big", "--capacity: 'big' is not a number"),
                              ("--priority", "first", "--priority: unknown mode(s) ['first']")):
        extra = [] if flag == "--capacity" else ["--capacity", "1"]
        bad = cli("eval", str(run), flag, value, *extra)
        assert bad.returncode == 2 and "Traceback" not in bad.stderr
        assert bad.stderr.strip().splitlines()[-1].startswith(f"megamoe: error: {text}"), \
            bad.stderr[-500:]
