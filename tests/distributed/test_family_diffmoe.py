"""DiffMoE (router `diffmoe`, papers.md §8b) on 2 gloo ranks.

- The EMA of the thresholds over two data-parallel ranks, by hand: every rank adds its
  micro-batches' quantiles, and after the step τ moves towards their mean over all of the
  step's micro-batches (not the mean of the ranks' means).
- The thresholds and the capacity predictor round-trip through a checkpoint (EP2).
- The vit family under EP2 (DP2): the same loss, step-1 gradients, parameters after 3 steps and
  thresholds (`expert_threshold`, a router buffer) as the single-process reference, which runs
  each rank's micro-batch as its own pool; perturbing one expert on one rank must break it.
"""

from types import SimpleNamespace

import pytest
import torch

from megamoe.testing.checkpointing import save_then_load
from megamoe.testing.parity import EP2, TINY_VIT, check_layout, reference, vit_parity_task
from megamoe.testing.pool import run_distributed

DIFFMOE = ["model.moe.router=diffmoe", "model.moe.diffmoe.predictor_loss_coeff=0.5"]

# Quantiles q = (q_0, q_1) of the micro-batches each rank sees (set directly: the hand vector
# of tests/unit/routers/test_diffmoe_pool.py checks how one micro-batch's are found).
# step 1: rank 0 one micro-batch (.75, .5), rank 1 one (.25, .9)
#   q̄ = (.5, .7);  τ = .95·0 + .05·q̄ = (.025, .035)
# step 2: rank 0 one micro-batch (.75, .5), rank 1 two of (.25, .9)
#   q̄ = ((.75 + .25 + .25)/3, (.5 + .9 + .9)/3) = (.416667, .766667)
#   τ = .95·(.025, .035) + .05·q̄ = (.023750 + .020833, .033250 + .038333) = (.044583, .071583)
#   (the mean of the ranks' means would give (.5, .7) again: τ = (.04875, .06825))
STEPS = {0: [[[.75, .5]], [[.75, .5]]], 1: [[[.25, .9]], [[.25, .9], [.25, .9]]]}
TAU = [[.025, .035], [.044583, .071583]]


def ema_task():
    """Each rank's thresholds after steps 1 and 2 (its router's DP group: the 2 ranks)."""
    import torch.distributed as dist
    from megatron.core.transformer import TransformerConfig

    from megamoe.moe.routers.diffmoe import DiffMoEPoolRouter

    cfg = TransformerConfig(num_layers=1, hidden_size=2, num_attention_heads=1,
                            num_moe_experts=2, moe_ffn_hidden_size=4, moe_router_topk=1,
                            moe_router_pre_softmax=True, add_bias_linear=False,
                            calculate_per_token_loss=True, use_cpu_initialization=True)
    groups = SimpleNamespace(tp=None, cp=None, tp_cp=None, dp_cp=None,
                             tp_dp_cp=dist.group.WORLD)
    router = DiffMoEPoolRouter(cfg, groups)
    rank = dist.get_rank()
    taus = []
    for step in range(2):
        for q in STEPS[rank][step]:
            router.step_quantiles += torch.tensor([*q, 1.0])
        router.after_step()
        taus.append(router.expert_threshold.tolist())
    return taus


@pytest.mark.timeout(300)
def test_threshold_ema_over_two_data_parallel_ranks():
    for taus in run_distributed(ema_task, 2):
        assert torch.allclose(torch.tensor(taus), torch.tensor(TAU), atol=1e-6), taus


@pytest.mark.timeout(600)
def test_vit_diffmoe_ep2_matches_single_process():
    ref = reference(DIFFMOE, dp=2, task=vit_parity_task)
    thresholds = [v for k, v in ref.router_state.items() if k.endswith("expert_threshold")]
    assert len(thresholds) == 2 and all(bool((t > 0).all()) for t in thresholds)
    assert ref.losses[0] > 0
    check_layout(DIFFMOE, EP2, ref, task=vit_parity_task)


@pytest.mark.timeout(300)
def test_thresholds_and_predictor_round_trip_through_a_checkpoint(tmp_path):
    """Every tensor randomised, saved, loaded into a differently seeded model: none differs."""
    model = [*TINY_VIT, *DIFFMOE, "parallel.expert=2"]
    out = run_distributed(save_then_load, 2, model, str(tmp_path), model)[0]
    assert out["differ"] == [], out["differ"]
    assert any(k.endswith("router.expert_threshold") for k in out["keys"])
    assert any(".router.capacity_predictor.2.weight" in k for k in out["keys"])
