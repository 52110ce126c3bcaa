"""Mixture-of-Recursions under data and expert parallelism gives the loss, step-1 gradients and
parameters after 3 SGD steps of the single-process reference (DESIGN.md tolerances), for both
depth routers; perturbing one shared-pool weight on one rank must break it.

Model: Middle-Cycle, L = 8 unrolled layers, N_r = 3 → first + 2 shared layers × 3 + last;
expert-choice capacities [1, 2/3, 1/3] (k = 16, 10, 5 of S = 16). EP2 puts 4-expert MoE FFNs in
every layer, shared ones included (the dispatcher sees a different token count per step).
Token-choice under DP2 uses the loss-free bias, whose update averages the depth ratios over the
DP ranks (compared as a router buffer).

TP2 + SP (dense): the recursion block routes the TP-gathered sequence and pads each compact
batch to a multiple of TP; k = 5 at the last expert-choice step is not divisible by 2 (one pad
per sequence), token-choice lengths vary. EP2 × TP2 (world 4, MoE everywhere, TINY's Switch aux
loss and z-loss on): expert-choice with k = 16, 8, 4 (no TP pad) and k = 16, 10, 5 (TP pads),
token-choice; every pad is masked in the shared MoE routers, and without the mask (reference and
TP run alike) the TP pads alone break parity. DP2 with the distributed optimizer (AdamW):
losses and parameters within 0.05·lr·steps.
"""

import pytest
import torch

from megamoe.testing.parity import compare, parity_task, reference
from megamoe.testing.pool import run_distributed

MOR = ["model.num_layers=8", "model.mor.enabled=true", "model.mor.num_recursions=3"]
ROUTERS = {
    "expert": ["model.mor.router=expert", "model.mor.allow_non_causal=true",
               "model.mor.aux_loss_coeff=0.01"],
    "token": ["model.mor.router=token"],
}
LOSS_FREE = ["model.mor.token.balancing=loss_free", "model.mor.token.bias_rate=0.01"]
DENSE = ["model.moe.num_experts=0"]
MOE_FIRST = "model.moe.layer_freq=[1,0,0,0,0,0,0,0]"
# gloo's all-gather needs equal sizes: experts unsharded (as in test_parity.py's ep2_tp2)
EP2_TP2 = ["parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=1"]
MODALITY = ["model.moe.router=modality", "model.moe.z_loss_coeff=0", "data.synthetic_modalities=2",
            "model.moe.modality.mode=pools", "model.moe.modality.pool_sizes=[2,2]"]
DISTOPT = ["parallel.distributed_optimizer=true"]
ADAM = ["train.optimizer=adamw", "train.lr=0.01", "train.min_lr=0.01"]

# (id, router, layout overrides, model overrides (the reference's too))
CASES = [
    ("dp2_expert", "expert", [], DENSE),
    ("dp2_token_loss_free", "token", [], DENSE + LOSS_FREE),
    ("ep2_expert", "expert", ["parallel.expert=2"], []),
    ("ep2_token", "token", ["parallel.expert=2"], []),
    ("tp2_expert", "expert", ["parallel.tensor=2"], DENSE),
    ("tp2_token", "token", ["parallel.tensor=2"], DENSE),
    ("ep2_tp2_expert", "expert", EP2_TP2, ["model.mor.capacities=[1.0,0.5,0.25]"]),
    # MoE in the pool under TP: shared MoE routers take every pad as padding (Switch aux loss
    # 0.01 and z-loss 0.001 of TINY on, so pads would count); k = 16, 10, 5: TP pads at step 3
    ("ep2_tp2_token", "token", EP2_TP2, []),
    ("ep2_tp2_expert_k5", "expert", EP2_TP2, []),
    # Uni-MoE modality pools in the pool: the block compacts the (synthetic) modality ids
    ("ep2_tp2_token_modality", "token", EP2_TP2, MODALITY),
    # DP2 with the distributed optimizer (AdamW): losses and parameters (no full gradients)
    ("dp2_distopt_token", "token", DISTOPT, ADAM),
    # stages [first, block] | [last, norm, head] (FLOP-balanced, megamoe.mor.stages)
    ("pp2_expert", "expert", ["parallel.pipeline=2"], []),
    ("pp2_token", "token", ["parallel.pipeline=2"], []),
    ("pp2_ep2_token", "token", ["parallel.pipeline=2", "parallel.expert=2"], []),
    # SP shards [S/TP, B, D] between the stages; k = 5 at the last step: one TP pad
    ("pp2_tp2_expert", "expert", ["parallel.pipeline=2", "parallel.tensor=2"], DENSE),
    # an MoE first layer outweighs last + head: [first] | [block, last, norm, head]
    ("pp2_block_last_expert", "expert", ["parallel.pipeline=2"], [MOE_FIRST]),
    # one unit per stage: the block on a middle stage (neither embedding nor head)
    ("pp3_token", "token", ["parallel.pipeline=3"], []),
]
PADDED = ["ep2_tp2_token", "ep2_tp2_expert_k5"]
@torch.no_grad()
def perturb_shared_pool(engine, scale: float = 1e-2) -> bool:
    """Negative control: change a shared-pool attention weight on one rank only, the last one
    holding the recursion block (under PP only the block's stage does)."""
    import torch.distributed as dist

    from megamoe.mor.decoder import mor_decoders

    decoders = mor_decoders(engine.modules)
    holds = [None] * dist.get_world_size()
    dist.all_gather_object(holds, bool(decoders))
    if dist.get_rank() != max(r for r, h in enumerate(holds) if h):
        return False
    w = decoders[0].recursion.layers[0].self_attention.linear_qkv.weight
    w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(99)) * scale)
    return True


def unmask_pads(engine) -> bool:
    """Negative control for the padded cases: the shared layers drop the recursion block's
    `padding_mask`, so MoE routers count the pads (in the reference too)."""
    from megamoe.mor.decoder import mor_decoders

    for layer in mor_decoders(engine.modules)[0].recursion.layers:
        forward = layer.forward
        layer.forward = lambda *args, padding_mask=None, _f=forward, **kw: _f(*args, **kw)
    return True


def compare_kw(layout, model) -> dict:
    """The distributed optimizer leaves each rank a shard of the reduced gradient: compare
    losses and parameters, AdamW's within 0.05·lr·steps (DESIGN.md)."""
    kw = {"grads": False} if DISTOPT[0] in layout else {}
    if ADAM[0] in model:
        kw["param_atol"] = 0.05 * 0.01 * 3
    return kw


def world(layout) -> int:
    """TP × PP ranks, twice that for DP2 (EP2 splits the experts over data-parallel ranks)."""
    degrees = dict(o.split("=") for o in layout)
    mp = int(degrees.get("parallel.tensor", 1)) * int(degrees.get("parallel.pipeline", 1))
    return 2 * mp if mp == 1 or "parallel.expert" in degrees else mp


def _case(router, layout, model):
    model = tuple(MOR + ROUTERS[router] + model)
    return reference(model, dp=2), list(model) + layout


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,router,layout,model", CASES, ids=[c[0] for c in CASES])
def test_mor_layout_matches_single_process(name, router, layout, model):
    ref, overrides = _case(router, layout, model)
    got = run_distributed(parity_task, world(layout), overrides)[0]
    problems = compare(ref, got, **compare_kw(layout, model))
    assert not problems, "\n".join(problems[:20])
    # the comparison covered the depth router and the shared pool
    assert any(".recursion.router." in k for k in got.params)
    assert any(".recursion.layers.1." in k for k in got.grads)
    if "loss_free" in name:
        bias = got.router_state["mor.router_bias"]
        assert bias.abs().max() > 0 and torch.equal(bias, ref.router_state["mor.router_bias"])
    if "parallel.expert=2" in layout:
        assert any("recursion.layers.0.mlp.experts" in k for k in got.params)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,router,layout,model", CASES, ids=[c[0] for c in CASES])
def test_mor_negative_control(name, router, layout, model):
    ref, overrides = _case(router, layout, model)
    got = run_distributed(parity_task, world(layout), overrides, perturb=perturb_shared_pool)[0]
    problems = compare(ref, got, **compare_kw(layout, model))
    assert any("recursion.layers.0" in p for p in problems), problems[:5]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,router,layout,model", [c for c in CASES if c[0] in PADDED],
                         ids=PADDED)
def test_mor_unmasked_pads_break_tp_parity(name, router, layout, model):
    """Without the padding mask (reference and TP run alike), the TP pads alone count in the
    shared MoE routers' losses: the TP run no longer matches (what config refused before)."""
    model = list(MOR + ROUTERS[router] + model)
    ref = run_distributed(parity_task, 1, model, reference_dp=2, perturb=unmask_pads)[0]
    got = run_distributed(parity_task, world(layout), model + layout, perturb=unmask_pads)[0]
    problems = compare(ref, got)
    assert any(".recursion.layers." in p and "router" in p for p in problems), problems[:5]
