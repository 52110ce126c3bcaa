"""Asynchronous interval checkpoints (`train.async_save`): training goes on while a forked writer
saves; every checkpoint is committed (meta, `latest`) and resuming from a middle one continues
with the losses of the uninterrupted run, bit for bit."""

import json
import os

import pytest

from megamoe.testing.pool import run_distributed
from megamoe.testing.recipes import train_recipe

STEPS = 6


QUICKSTART = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "lm_quickstart.yaml")


def train_run(run_dir: str, extra: list) -> list[dict]:
    """metrics.jsonl step records of a short 2-rank EP2 run of the quickstart."""
    return run_distributed(train_recipe, 2, QUICKSTART, [
        "parallel.world_size=2", "parallel.tensor=1", "parallel.expert=2",
        "model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
        f"train.steps={STEPS}", "train.warmup_steps=1", "train.eval_iters=0", "train.keep_last=0",
        "run.tensorboard=false", *extra], run_dir)[0][1]


@pytest.mark.timeout(600)
def test_async_saves_commit_and_resume_bit_exact(tmp_path):
    a = str(tmp_path / "async")
    straight = train_run(a, ["train.save_interval=1", "train.async_save=true"])
    root = os.path.join(a, "checkpoints")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    assert steps == [f"step_{i:07d}" for i in range(1, STEPS + 1)], os.listdir(root)
    assert not [d for d in os.listdir(root) if d.startswith(".tmp-")]
    for d in steps:
        with open(os.path.join(root, d, "meta.json")) as f:
            assert json.load(f)["step"] == int(d[5:])
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == steps[-1]

    resumed = train_run(str(tmp_path / "resumed"),
                        [f"train.resume={os.path.join(root, steps[2])}"])
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight][3:]
