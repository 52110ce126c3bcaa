"""Asynchronous interval checkpoints (`train.async_save`): training goes on while a forked writer
saves; every checkpoint is committed (meta, `latest`) and resuming from a middle one continues
with the losses of the uninterrupted run, bit for bit."""

import json
import os

import pytest

from megamoe.testing.pool import run_distributed

STEPS = 6


def train_run(run_dir: str, extra: list):
    import torch
    import torch.distributed as dist

    from megamoe.config import load_config
    from megamoe.training.loop import train

    os.makedirs(run_dir, exist_ok=True)          # the CLI makes it; train() expects it
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                   "quickstart.yaml"), [
        "parallel.world_size=2", "parallel.tensor=1", "parallel.expert=2",
        "model.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
        f"train.steps={STEPS}", "train.warmup_steps=1", "train.eval_iters=0", "train.keep_last=0",
        f"run.dir={run_dir}", "run.tensorboard=false", "run.progress=false", *extra])
    train(cfg, torch.device("cpu"))
    if dist.get_rank() != 0:
        return None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


@pytest.mark.timeout(600)
def test_async_saves_commit_and_resume_bit_exact(tmp_path):
    a = str(tmp_path / "async")
    straight = run_distributed(train_run, 2, a, ["train.save_interval=1",
                                                 "train.async_save=true"])[0]
    root = os.path.join(a, "checkpoints")
    steps = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    assert steps == [f"step_{i:07d}" for i in range(1, STEPS + 1)], os.listdir(root)
    assert not [d for d in os.listdir(root) if d.startswith(".tmp-")]
    for d in steps:
        with open(os.path.join(root, d, "meta.json")) as f:
            assert json.load(f)["step"] == int(d[5:])
    with open(os.path.join(root, "latest")) as f:
        assert f.read().strip() == steps[-1]

    resumed = run_distributed(train_run, 2, str(tmp_path / "resumed"),
                              [f"train.resume={os.path.join(root, steps[2])}"])[0]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in straight][3:]
