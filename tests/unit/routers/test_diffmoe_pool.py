"""DiffMoE (papers.md §8b, router `diffmoe`): a hand vector with B = 2 images, s = 3 tokens,
E = 2 experts — the pool selection, the BCE target and loss, the quantiles the thresholds
follow, the per-token inference k_e and the reference code's pool top-k rule — plus the
predictor's stop-gradient and loss scale, the EMA rule over micro-batches, and batch
independence in evaluation (one image alone against the same image inside a batch of 8).
The EMA over two data-parallel ranks runs on 2 gloo ranks in
tests/distributed/test_family_diffmoe.py."""

import math
from types import SimpleNamespace

import pytest
import torch

from megamoe.blocks.context import Context
from megamoe.moe.routers.diffmoe import DiffMoEPoolRouter, pool_capacity

# Megatron order t = s·B + b: sample b=0 holds t0, t2, t4; sample b=1 holds t1, t3, t5.
# Gate scores s = softmax over E = 2 (the hidden states are ln s with W_g = I):
SCORES = [[.9, .1], [.2, .8], [.6, .4], [.7, .3], [.3, .7], [.45, .55]]
# Pool: N = 6, C = 1 → k = ⌊1·6/2⌋ = 3 tokens per expert.
#   e0 column: .9 t0, .7 t3, .6 t2 | .45 t5, .3 t4, .2 t1  → {t0, t2, t3}
#   e1 column: .8 t1, .7 t4, .55 t5 | .4 t2, .3 t3, .1 t0  → {t1, t4, t5}
# (image b=0 gives e0 two tokens and e1 one: per image, EC-DiT's top-⌊3/2⌋ = 1 would route
# only t0, t4 of it; the pool lets an expert take more tokens of one image)
POOL_MAP = [[1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [0, 1]]
POOL_PROBS = [[.9, 0], [0, .8], [.6, 0], [.7, 0], [0, .7], [0, .55]]
# Capacity-predictor logits chosen so that σ(p) is round: ln 9 → .9, ln(1/3) → .25, 0 → .5,
# ln 4 → .8, ln(1/4) → .2, ln 3 → .75 (and their complements).
SIGMOID_P = [[.9, .1], [.25, .75], [.5, .5], [.8, .2], [.2, .8], [.75, .25]]
PRED_LOGITS = [[math.log(p / (1 - p)) for p in row] for row in SIGMOID_P]
# BCE target = POOL_MAP; BCE(z, y) = −y ln σ(z) − (1−y) ln(1−σ(z)), per token (e0 + e1):
#   t0 y=(1,0): −ln .9 − ln .9             = 0.210721
#   t1 y=(0,1): −ln .75 − ln .75           = 0.575364
#   t2 y=(1,0): −ln .5 − ln .5             = 1.386294
#   t3 y=(1,0): −ln .8 − ln .8             = 0.446287
#   t4 y=(0,1): −ln .8 − ln .8             = 0.446287
#   t5 y=(0,1): −ln(1 − .75) − ln .25      = 2.772589
#   sum 5.837542, mean over N·E = 12 entries 0.486462
BCE_MEAN = 0.486462
# Quantiles q_e = the k = 3rd largest σ(p_·e):
#   e0: .9 .8 .75 | .5 .25 .2 → .75;   e1: .8 .75 .5 | .25 .2 .1 → .5
QUANTILES = [.75, .5]
# Inference with τ = (.6, .6): M_te = 1[σ(p_te) > τ_e]
#   e0: t0 .9, t3 .8, t5 .75 pass → k_0 = 3;   e1: t1 .75, t4 .8 pass → k_1 = 2
#   t2 gets no expert; t5 gets e0 although its gate prefers e1; weights are gate scores.
TAU = [.6, .6]
EVAL_MAP = [[1, 0], [0, 1], [0, 0], [1, 0], [0, 1], [1, 0]]
EVAL_PROBS = [[.9, 0], [0, .8], [0, 0], [.7, 0], [0, .7], [.45, 0]]
# active compute: per expert k_e / N = (3/6, 2/6); experts per token 5/6 (C = 1: also relative)
# The code's rule (pool_topk): the same k = (3, 2), but e0 takes its top-3 by gate score
# {t0 .9, t3 .7, t2 .6} and e1 its top-2 {t1 .8, t4 .7}: t2 instead of t5 on e0.
POOL_TOPK_MAP = [[1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [0, 0]]


class LookupPredictor(torch.nn.Module):
    """Stands in for Linear → SiLU → Linear: the logits of the table row equal to the token."""

    def __init__(self, hidden_ND: torch.Tensor, logits_NE: torch.Tensor):
        super().__init__()
        self.hidden_ND, self.logits_NE = hidden_ND, logits_NE

    def forward(self, x_TD):
        match_TN = (x_TD[:, None, :] - self.hidden_ND[None]).abs().sum(-1) < 1e-6
        assert bool((match_TN.sum(-1) == 1).all())
        return match_TN.float() @ self.logits_NE


def make_router(hidden: int = 2, experts: int = 2, **options) -> DiffMoEPoolRouter:
    from megatron.core.transformer import TransformerConfig

    from megamoe.platform.bridge import apply_cpu_bridge

    apply_cpu_bridge()         # Megatron's Router.gating moves its weight to CUDA otherwise
    cfg = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1,
                            num_moe_experts=experts, moe_ffn_hidden_size=4, moe_router_topk=1,
                            moe_router_pre_softmax=True, add_bias_linear=False,
                            calculate_per_token_loss=True, use_cpu_initialization=True)
    groups = SimpleNamespace(tp=None, cp=None, tp_cp=None, dp_cp=None, tp_dp_cp=None)
    return DiffMoEPoolRouter(cfg, groups, **options)


def hand_router(**options) -> tuple[DiffMoEPoolRouter, torch.Tensor]:
    """(router with W_g = I and the lookup predictor, hidden [S=3, B=2, D=2] = ln s)."""
    router = make_router(**options)
    with torch.no_grad():
        router.weight.copy_(torch.eye(2))
    hidden_TD = torch.tensor(SCORES).log()
    router.capacity_predictor = LookupPredictor(hidden_TD, torch.tensor(PRED_LOGITS))
    return router, hidden_TD.view(3, 2, 2)


def test_capacity_is_floor_of_c_tokens_over_experts():
    assert pool_capacity(6, 2, 1) == 3
    assert pool_capacity(64 * 256, 16, 1) == 1024              # papers.md §14 T13
    assert pool_capacity(10, 3, 1) == 3                        # the code's int(10/3·1)
    assert pool_capacity(2, 4, 1) == 1 and pool_capacity(6, 2, 2) == 6


def test_hand_vector_pool_selection_bce_and_quantiles():
    router, hidden_SBD = hand_router()
    router.train()
    out = router.route(hidden_SBD, Context())
    assert out.routing_map_TE.int().tolist() == POOL_MAP
    assert torch.allclose(out.probs_TE, torch.tensor(POOL_PROBS), atol=1e-6)
    assert out.stats["capacity"] == 3
    assert out.stats["predictor_loss"] == pytest.approx(BCE_MEAN, abs=1e-6)
    q_E, count = router.step_quantiles[:2], router.step_quantiles[2]
    assert torch.allclose(q_E, torch.tensor(QUANTILES), atol=1e-6) and count == 1
    router.after_step()                                        # τ = .95·0 + .05·q
    assert torch.allclose(router.expert_threshold, 0.05 * torch.tensor(QUANTILES), atol=1e-7)


def test_hand_vector_inference_k_e_and_active_compute():
    router, hidden_SBD = hand_router()
    router.expert_threshold.copy_(torch.tensor(TAU))
    router.eval()
    with torch.no_grad():
        out = router.route(hidden_SBD, Context())
    assert out.routing_map_TE.int().tolist() == EVAL_MAP
    assert out.routing_map_TE.sum(0).tolist() == [3, 2]        # k_e
    assert torch.allclose(out.probs_TE, torch.tensor(EVAL_PROBS), atol=1e-6)
    active = router.active_compute()
    assert active["per_expert"] == pytest.approx([.5, 1 / 3])
    assert active["experts_per_token"] == pytest.approx(5 / 6)
    assert active["relative_to_training"] == pytest.approx(5 / 6)
    assert router.active_compute() is None                     # read and reset
    router.after_step()                                        # evaluation recorded nothing
    assert torch.equal(router.expert_threshold, torch.tensor(TAU))


def test_hand_vector_the_codes_pool_topk_rule_depends_on_the_batch():
    router, hidden_SBD = hand_router(inference="pool_topk")
    router.expert_threshold.copy_(torch.tensor(TAU))
    router.eval()
    with torch.no_grad():
        out = router.route(hidden_SBD, Context())
        # image b=0 alone (t0, t2, t4): k_0 = #{.9} = 1 → e0 takes t0 only (t2 in the batch)
        alone = router.route(hidden_SBD[:, :1], Context())
    assert out.routing_map_TE.int().tolist() == POOL_TOPK_MAP
    assert alone.routing_map_TE.int().tolist() == [[1, 0], [0, 0], [0, 1]]
    assert not torch.equal(alone.routing_map_TE, out.routing_map_TE.view(3, 2, 2)[:, 0])


def test_ema_is_over_the_steps_micro_batches():
    """τ ← m·τ + (1−m)·q̄ with q̄ the mean over the step's micro-batches (m = .5 here)."""
    router, hidden_SBD = hand_router(ema_momentum=0.5)
    router.train()
    router.route(hidden_SBD, Context())                        # q = (.75, .5)
    # the images swapped: a second micro-batch of the same step, same quantiles
    router.route(hidden_SBD.flip(1), Context())
    with torch.no_grad():
        router.route(hidden_SBD, Context())                    # a recompute's no-grad pass
    assert router.step_quantiles[2] == 2                       # ... is not counted
    router.after_step()                                        # τ = .5·0 + .5·(.75, .5)
    assert torch.allclose(router.expert_threshold, torch.tensor([.375, .25]))
    router.after_step()                                        # no micro-batch: unchanged
    assert torch.allclose(router.expert_threshold, torch.tensor([.375, .25]))


def test_predictor_reads_detached_inputs_and_its_loss_is_scaled_by_the_images():
    """The BCE reaches only the predictor (its input is detached): the hidden states' gradient
    is the routing's alone; the predictor's gradient is coeff·B·∂BCE_mean (B = 2 images)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    g = torch.Generator().manual_seed(0)
    coeff = 0.3
    router = make_router(hidden=4, experts=2, predictor_loss_coeff=coeff)
    assert isinstance(router.capacity_predictor[1], torch.nn.SiLU)
    router.train()
    x = torch.randn(3, 2, 4, generator=g).requires_grad_()
    out = router.route(x, Context())
    out.probs_TE.sum().backward()
    # reference: the same routing without the predictor's loss, and the BCE on its own
    x_ref = x.detach().clone().requires_grad_()
    scores = torch.softmax(x_ref.view(-1, 4) @ router.weight.detach().t(), dim=-1)
    (scores * out.routing_map_TE).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    grads = [p.grad.clone() for p in router.capacity_predictor.parameters()]
    for p in router.capacity_predictor.parameters():
        p.grad = None
    pred = router.capacity_predictor(x.detach().view(-1, 4))
    bce = torch.nn.functional.binary_cross_entropy_with_logits(pred, out.routing_map_TE.float())
    (coeff * 2 * bce).backward()
    for got, p in zip(grads, router.capacity_predictor.parameters()):
        assert torch.allclose(got, p.grad, atol=1e-6)
    assert grads[0].abs().sum() > 0


def test_inference_is_batch_independent_one_image_against_a_batch_of_8():
    """max |Δ| of one image's combine weights alone vs inside a batch of 8 ≤ 1e-5 with the
    per-token rule; the training-time pool selection is not (a control that the batch
    matters to the pool)."""
    g = torch.Generator().manual_seed(1)
    router = make_router(hidden=8, experts=4)
    router.expert_threshold.copy_(torch.full((4,), 0.5))
    x_SBD = torch.randn(16, 8, 8, generator=g)
    with torch.no_grad():
        router.eval()
        batch = router.route(x_SBD, Context()).probs_TE.view(16, 8, 4)
        alone = router.route(x_SBD[:, 3:4], Context()).probs_TE.view(16, 1, 4)
        assert (batch[:, 3:4] - alone).abs().max().item() <= 1e-5
        assert batch.abs().max() > 0
        router.train()
        batch = router.route(x_SBD, Context()).probs_TE.view(16, 8, 4)
        alone = router.route(x_SBD[:, 3:4], Context()).probs_TE.view(16, 1, 4)
        assert (batch[:, 3:4] - alone).abs().max().item() > 1e-3
