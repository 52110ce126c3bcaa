"""Both MoR recipes train: 30 steps of configs/mor_{expert,token}.yaml on 2 gloo ranks (EP2 for
the MoE FFNs of the shared layers, DP2 for the rest); the loss must fall and never go below the
built-in corpus's entropy rate (a lower loss would mean a leak of the future, e.g. through the
expert-choice top-k over the sequence). The run ends with a checkpoint of the MoR model."""

import os

import pytest

from megamoe.testing.pool import run_distributed
from megamoe.testing.recipes import train_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 30


def train_mor(router: str, run_dir: str):
    return run_distributed(train_recipe, 2, os.path.join(ROOT, "configs", f"mor_{router}.yaml"), [
        "model.seq_length=32", "train.micro_batch_size=4", "train.global_batch_size=8",
        f"train.steps={STEPS}", "train.warmup_steps=3", "train.eval_iters=0",
        "train.resume=none", "run.tensorboard=false", "run.log_interval=1000"], run_dir)[0]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("router", ["expert", "token"])
def test_mor_recipe_trains_above_the_entropy_rate(router, tmp_path):
    summary, records = train_mor(router, str(tmp_path))
    losses = [r["loss"] for r in records]
    assert len(losses) == STEPS
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0], losses
    assert min(losses) > summary["entropy_rate"], (min(losses), summary["entropy_rate"])
