"""The context is bound by the model's forward for the duration of the call only, nested binds
restore the outer one, the training step builds it from the micro-batch (with the loader's
sample indices), and the activation-recompute options are checked with one error each."""

import pytest
import torch

from megamoe.blocks.context import Context, bind, bound_context, current_context
from megamoe.config import load_config
from megamoe.config.errors import ConfigError


def test_nested_binds_restore_the_outer_context():
    outer, inner = Context(step=1), Context(step=2)
    assert bound_context() is None and current_context().step is None
    with bind(outer):
        assert current_context() is outer
        with bind(inner):
            assert current_context() is inner
            with bind(None):                      # "no context": layers read an empty one
                assert bound_context() is None and current_context().sample_index_B is None
            assert current_context() is inner
        assert current_context() is outer
        with pytest.raises(RuntimeError), bind(inner):
            raise RuntimeError("a failing layer")
        assert current_context() is outer         # restored on the way out of an error
    assert bound_context() is None


def model_call_task():
    """(context seen by the first MoE layer during the call, bound after it, seen inside an
    outer bind, bound after that call) on one rank."""
    from megamoe.models.lm.model import lm_context, moe_layers
    from megamoe.testing.parity import TINY_VOCAB, microbatch, tiny_config
    from megamoe.engines.megatron import build_engine

    cfg = tiny_config(["parallel.world_size=1", "data.synthetic_modalities=2"])
    model = build_engine(cfg, TINY_VOCAB, torch.device("cpu"), with_optimizer=False,
                         ddp=False).modules[0]
    seen = []
    moe_layers([model])[0].register_forward_pre_hook(lambda *_: seen.append(bound_context()))
    mb = microbatch(3, 1, 0, 1, 2, cfg.model.seq_length, TINY_VOCAB, gbs=8)
    context = lm_context(mb, cfg, step=3)
    with torch.no_grad():
        model(mb["tokens"], mb["position_ids"], None, context=context)
        after = bound_context()
        outer = Context(step=7)
        with bind(outer):
            model(mb["tokens"], mb["position_ids"], None, context=context)
            after_nested = bound_context()
    return (seen[0] is context, after, seen[1] is context, after_nested is outer,
            context.sample_index_B.tolist(), context.step, context.modality_ids_BS is not None)


@pytest.mark.timeout(300)
def test_model_binds_its_context_only_during_the_call():
    from megamoe.testing.pool import run_distributed

    inside, after, inside_nested, outer_back, samples, step, modalities = \
        run_distributed(model_call_task, 1)[0]
    assert inside and after is None
    assert inside_nested and outer_back
    assert samples == [26, 27] and step == 3 and modalities   # step 3 · 8 + micro-batch 1 · 2


def test_recompute_options_are_checked():
    from megamoe.models.lm.model import recompute_options

    m = load_config(None, ["model.recompute_granularity=full", "model.recompute_method=block",
                           "model.recompute_num_layers=2"]).model
    assert recompute_options(m) == {"recompute_granularity": "full", "recompute_method": "block",
                                    "recompute_num_layers": 2}
    m = load_config(None, ["model.recompute_granularity=selective",
                           "model.recompute_modules=[moe,core_attn]"]).model
    assert recompute_options(m) == {"recompute_granularity": "selective",
                                    "recompute_modules": ["moe", "core_attn"]}
    assert recompute_options(load_config(None, []).model) == {}
    for bad, field in [("model.recompute_granularity=partial", "model.recompute_granularity"),
                       ("model.recompute_method=every", "model.recompute_method"),
                       ("model.recompute_num_layers=0", "model.recompute_num_layers"),
                       ("model.recompute_modules=[moe_act]", "model.recompute_modules")]:
        with pytest.raises(ConfigError, match=field):
            load_config(None, [bad])
    ln = load_config(None, ["model.recompute_granularity=selective",
                            "model.recompute_modules=[layernorm]"]).model
    with pytest.raises(ConfigError, match="model.recompute_modules: 'layernorm' needs Transformer"):
        recompute_options(ln)
    if not torch.cuda.is_available():
        mlp = load_config(None, ["model.recompute_granularity=selective",
                                 "model.recompute_modules=[mlp]"]).model
        with pytest.raises(ConfigError, match="model.recompute_modules: 'mlp' is not supported"):
            recompute_options(mlp)
