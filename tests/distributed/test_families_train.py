"""Every router family trains: a few dozen steps of its example config (configs/<family>.yaml,
else the quickstart with the family selected) on 2 gloo ranks with EP2; the loss must fall and
never go below the built-in corpus's entropy rate (a lower loss would mean a leak of the future,
e.g. through a router that looks across tokens); routing statistics are logged."""

import os

import pytest

from megamoe.testing.pool import run_distributed
from megamoe.testing.recipes import train_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 30


def _families() -> list[str]:
    """Every router family, plus the top-k recipe with DeepSeek's loss-free balancing."""
    from megamoe.moe.routers import ROUTERS

    return sorted(ROUTERS) + ["loss_free"]


def _recipe(family: str) -> tuple[str, list[str]]:
    path = os.path.join(ROOT, "configs", f"{family}.yaml")
    if os.path.isfile(path):
        return path, []
    return os.path.join(ROOT, "configs", "lm_quickstart.yaml"), [f"model.moe.router={family}"]


def train_family(family: str, run_dir: str):
    path, extra = _recipe(family)
    return run_distributed(train_recipe, 2, path, extra + [
        "parallel.world_size=2", "parallel.tensor=1", "parallel.pipeline=1",
        "parallel.expert=2", "parallel.expert_tensor=1", "parallel.virtual_pipeline=null",
        "model.seq_length=32", "train.micro_batch_size=4", "train.global_batch_size=8",
        f"train.steps={STEPS}", "train.warmup_steps=3", "train.lr=3e-3", "train.eval_iters=0",
        "train.save_interval=0", "train.resume=none", "run.tensorboard=false",
        "run.log_interval=1000"], run_dir)[0]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("family", _families())
def test_family_trains_above_the_entropy_rate(family, tmp_path):
    summary, records = train_family(family, str(tmp_path))
    losses = [r["loss"] for r in records]
    assert len(losses) == STEPS
    # routing statistics reach the logs (TensorBoard gets the same keys)
    assert any(k.startswith("router/") for k in records[-1]), sorted(records[-1])
    if family in ("vmoe", "race"):       # BPR (the vmoe recipe) and Expert Race report τ
        assert "router/threshold" in records[-1], sorted(records[-1])
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0], losses
    assert min(losses) > summary["entropy_rate"], (min(losses), summary["entropy_rate"])
