"""What each pipeline stage of an MoR model holds (PP2 on the gloo test pool): its units
(megamoe.mor.stages), checkpoint keys independent of the stage (`decoder.layers.0` the unique
first layer, `decoder.layers.1` the last, `decoder.recursion.*`), the pool's layer numbers
(slot + 1, free of Megatron's stage offset), and the initialisation by global key (PP2 holds
exactly the one-process model before any step). Parity of training under PP: test_mor_parity.py.
"""

import pytest
import torch

from megamoe.testing.parity import parity_task
from megamoe.testing.pool import run_distributed

MOR = ["model.num_layers=8", "model.mor.enabled=true", "model.mor.num_recursions=3",
       "model.mor.router=token"]
PP2 = ["parallel.pipeline=2"]


def stage_task(overrides):
    """(units, checkpoint keys, layer numbers, final norm, embedding, head) of a rank."""
    import torch.distributed as dist

    from megamoe.mor.decoder import MoRDecoder
    from megamoe.testing.parity import TINY_VOCAB, tiny_config
    from megamoe.engines.megatron import build_engine

    cfg = tiny_config([f"parallel.world_size={dist.get_world_size()}", *overrides])
    model = build_engine(cfg, TINY_VOCAB, torch.device("cpu"), with_optimizer=False,
                         ddp=False).modules[0]
    decoder = model.decoder
    assert isinstance(decoder, MoRDecoder)
    keys = {sh.key for sh in _leaves(model.sharded_state_dict())}
    numbers = [layer.layer_number for layer in decoder.layers]
    if decoder.recursion is not None:
        numbers += [layer.layer_number for layer in decoder.recursion.layers]
        numbers += [e.layer_number for layer in decoder.recursion.layers
                    for e in [layer.mlp] if hasattr(e, "layer_number")]
    return {"units": decoder.units, "keys": sorted(keys), "numbers": numbers,
            "norm": decoder.final_layernorm is not None, "pre": model.pre_process,
            "post": model.post_process}


def _leaves(sd):
    from megamoe.models.global_view import _leaves as leaves

    return list(leaves(sd))


@pytest.mark.timeout(300)
def test_each_stage_holds_its_units_under_global_keys():
    stage0, stage1 = run_distributed(_all_ranks, 2, MOR + PP2)[0]
    assert stage0["units"] == ("first", "block") and stage1["units"] == ("last",)
    assert (stage0["pre"], stage0["post"], stage0["norm"]) == (True, False, False)
    assert (stage1["pre"], stage1["post"], stage1["norm"]) == (False, True, True)
    assert any(k.startswith("decoder.layers.0.mlp") for k in stage0["keys"])
    assert not any("decoder.layers.1" in k for k in stage0["keys"])
    assert any(k.startswith("decoder.recursion.layers.1") for k in stage0["keys"])
    assert any(k.startswith("decoder.recursion.router") for k in stage0["keys"])
    assert any(k.startswith("embedding") for k in stage0["keys"])
    assert any(k.startswith("decoder.layers.1.") for k in stage1["keys"])
    assert not any("decoder.layers.0" in k or "recursion" in k for k in stage1["keys"])
    assert any(k.startswith("output_layer") for k in stage1["keys"])
    # pool slots: first 0, shared 1..2, last K + 1 = 3 → layer numbers slot + 1 on each stage
    # (Megatron alone would add 4 = L / PP on stage 1); MoE layers carry the same number
    assert stage0["numbers"][:3] == [1, 2, 3] and set(stage0["numbers"][3:]) == {2, 3}
    assert stage1["numbers"] == [4]


def _all_ranks(overrides):
    """stage_task of every rank, returned on rank 0."""
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, stage_task(overrides))
    return out if dist.get_rank() == 0 else None


@pytest.mark.timeout(300)
def test_pp2_initialisation_is_the_single_process_model():
    ref = run_distributed(parity_task, 1, MOR, steps=0)[0]
    got = run_distributed(parity_task, 2, MOR + PP2, steps=0)[0]
    assert set(ref.params) == set(got.params)
    for key in ref.params:
        assert torch.equal(ref.params[key], got.params[key]), key
    # the unique layers differ from each other (initialised by their own keys)
    a = ref.params["decoder.layers.0.self_attention.linear_qkv.weight"]
    assert not torch.equal(a, ref.params["decoder.layers.1.self_attention.linear_qkv.weight"])


def router_buffer_keys_task(overrides):
    """The global keys `gather_router_buffers` gives this layout's router buffers (all ranks)."""
    import torch.distributed as dist

    from megamoe.checkpoint.router_state import gather_router_buffers
    from megamoe.testing.parity import TINY_VOCAB, tiny_config
    from megamoe.engines.megatron import build_engine

    cfg = tiny_config([f"parallel.world_size={dist.get_world_size()}", *overrides])
    engine = build_engine(cfg, TINY_VOCAB, torch.device("cpu"), with_optimizer=False, ddp=False)
    return sorted(gather_router_buffers(engine.modules))


@pytest.mark.timeout(300)
def test_router_buffers_keep_their_global_keys_on_every_stage():
    """Loss-free MoE biases of the unique layers are keyed `decoder.layers.{0,1}` also on the
    stage that holds only the last layer (as exports and parity read them)."""
    loss_free = MOR + ["model.moe.loss_free_bias_rate=0.01", "model.mor.token.balancing=loss_free"]
    ref = run_distributed(router_buffer_keys_task, 1, loss_free)[0]
    got = run_distributed(router_buffer_keys_task, 2, loss_free + PP2)[0]
    assert "decoder.layers.1.mlp.router.selection_bias" in ref
    assert "decoder.recursion.router.router_bias" in ref
    assert got == ref
