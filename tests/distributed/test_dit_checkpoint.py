"""dit checkpoints reshard like the other families', EMA included: trained and saved under EP2,
loaded under PP2 (each stage holding the embedders), the next steps' losses, the parameters
and the EMA weights match the single-process run that never stopped. Control: a run that
loads everything but the EMA (reset to the loaded weights) differs in the EMA only."""

import pytest

from megamoe.testing.checkpointing import train_and_save
from megamoe.testing.dit import TINY_DIT, continue_with_ema, straight_with_ema
from megamoe.testing.pool import run_distributed

K, MORE, LR = 2, 2, 0.01
MODEL = [*TINY_DIT, "train.optimizer=adamw", f"train.lr={LR}", f"train.min_lr={LR}"]


def ema_reset_task(overrides, root, start, steps):
    """`continue_with_ema` whose EMA is restarted from the loaded weights (a lost EMA)."""
    import megamoe.checkpoint.load as L

    saved = L.load_checkpoint

    def load_then_reset(engine, *args, **kwargs):
        out = saved(engine, *args, **kwargs)
        for chunk in engine.modules:
            chunk.ema.reset()
        return out

    L.load_checkpoint = load_then_reset
    try:
        return continue_with_ema(overrides, root, start, steps)
    finally:
        L.load_checkpoint = saved


def _worst(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.timeout(600)
def test_dit_reshard_keeps_the_ema(tmp_path):
    root = str(tmp_path / "ckpt")
    run_distributed(train_and_save, 2, [*MODEL, "parallel.expert=2"], root, K)
    ref_losses, ref_params, ref_ema = run_distributed(straight_with_ema, 1, MODEL, K + MORE)[0]
    load = [*MODEL, "parallel.pipeline=2"]
    losses, params, ema = run_distributed(continue_with_ema, 2, load, root, K, MORE)[0]
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref_losses[K:], losses))
    bound = 0.05 * LR * MORE
    assert _worst(ref_params, params) <= bound
    assert _worst(ref_ema, ema) <= bound
    assert _worst(ref_ema, ref_params) > 10 * bound     # the EMA is not the weights
    _, params, ema = run_distributed(ema_reset_task, 2, load, root, K, MORE)[0]
    assert _worst(ref_params, params) <= bound
    assert _worst(ref_ema, ema) > bound
