"""Megatron's aux-loss tracker is a process-wide dict whose entries are sized by the first model
that records into it. A process that trains a 2-layer model and then a 4-layer one (a pooled
test worker does exactly that) must not index the old entries with the new layer numbers:
building a model starts the tracker empty (megamoe.engines.megatron.build_model). Control: a
tracker that ignores the clear fails the second model as the suite once did (IndexError)."""

import pytest

from megamoe.testing.parity import TINY_VOCAB, parity_run, tiny_config
from megamoe.testing.pool import run_distributed


class _IgnoresClear(dict):
    def clear(self):
        pass


def two_models_task(keep_stale: bool = False):
    """One step of a 2-layer model, then of the 4-layer one: its loss, or the error's name."""
    from megatron.core.transformer.moe import moe_utils

    parity_run(tiny_config(["model.num_layers=2"]), TINY_VOCAB, steps=1)
    assert len(moe_utils.get_moe_layer_wise_logging_tracker()["z_loss"]["values"]) == 2
    real = moe_utils.get_moe_layer_wise_logging_tracker
    if keep_stale:
        stale = _IgnoresClear(real())
        moe_utils.get_moe_layer_wise_logging_tracker = lambda: stale
    try:
        return parity_run(tiny_config([]), TINY_VOCAB, steps=1).losses[0]
    except IndexError as exc:
        return type(exc).__name__
    finally:
        moe_utils.get_moe_layer_wise_logging_tracker = real
        real().clear()


@pytest.mark.timeout(300)
def test_a_second_model_with_more_layers_records_its_router_losses():
    loss = run_distributed(two_models_task, 1)[0]
    assert isinstance(loss, float) and loss > 0
    assert run_distributed(two_models_task, 1, keep_stale=True)[0] == "IndexError"   # control
