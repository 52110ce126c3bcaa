"""Expert Race (papers.md §7): §14 T11 (threshold, mask, P', W, L_sim = 0.362730), a hand-computed
case with co-activation for the two uncertain normalisations, the EMA threshold and its
batch-independent evaluation rule, and the scale of the similarity loss's gradient."""

from types import SimpleNamespace

import pytest
import torch

from megamoe.moe.routers.race import (
    RaceRouter,
    race_scores,
    race_threshold,
    router_similarity_loss,
    similarity_weights,
)

# T11: B·L = 2 tokens, E = 3 experts, identity gating (the scores are the logits)
S = torch.tensor([[.9, .1, .5], [.2, .8, .7]])
S2 = torch.tensor([[.3, .1, .2], [0., .4, .1]])   # k = 1: τ = .3, the 2nd largest
P_PRIME = torch.tensor([[.272602, .191167, .231679],
                        [.191167, .211039, .217333],
                        [.231679, .217333, .236001]])


def test_t11_threshold_mask_and_similarity_loss():
    tau = race_threshold(S, k=1)                  # 𝒦 = 2·1: the 2nd largest of all 6 scores
    assert tau.item() == pytest.approx(0.8)
    mask = S >= tau
    assert mask.int().tolist() == [[1, 0, 0], [0, 1, 0]]
    P = torch.softmax(S, dim=-1)
    assert torch.allclose(P.t() @ P, P_PRIME, atol=1e-6)
    coactive = mask.float().t() @ mask.float()    # M' = diag(1, 1, 0)
    W = similarity_weights(coactive, "off_diagonal")
    assert torch.allclose(W, torch.diag(torch.tensor([1.5, 1.5, 0.0])))   # E·M'_ii / 2
    share, value = router_similarity_loss(S, mask)
    assert value.item() == pytest.approx(0.362730, abs=1e-6)
    assert share.item() == pytest.approx(0.362730, abs=1e-6)   # one rank: the share is all


# k = 2 on T11: 𝒦 = 4, sorted scores .9 .8 .7 .5 | .2 .1, so τ = .5 and
#   M = [[1,0,1],[0,1,1]],  M' = MᵀM = [[1,0,1],[0,1,1],[1,1,2]]
#   W_ii = 3·[1,1,2]/4 = [.75, .75, 1.5]
#   off-diagonal: M'_02 = M'_12 = 1 (and symmetric), M'_01 = 0
#     Σ_{k≠l} M' = 4 → W_02 = W_12 = 6·1/4 = 1.5;   Σ_all M' = 8 → 6·1/8 = .75
#   Σ W_ii P'_ii = .75·.272602 + .75·.211039 + 1.5·.236001 = .716732
#   Σ_{i≠j} M'_ij P'_ij = 2·.231679 + 2·.217333 = .898024
#   tokens, off_diagonal:  (.716732 + 1.5·.898024) / 2 = 1.031884
#   tokens, all:           (.716732 + .75·.898024) / 2 = .695125
#   tokens_experts: the same divided by E = 3 → .343961, .231708
@pytest.mark.parametrize("divisor,off_diagonal,want", [
    ("tokens", "off_diagonal", 1.031884), ("tokens", "all", 0.695125),
    ("tokens_experts", "off_diagonal", 0.343961), ("tokens_experts", "all", 0.231708)])
def test_similarity_normalisations_with_coactivation(divisor, off_diagonal, want):
    tau = race_threshold(S, k=2)
    assert tau.item() == pytest.approx(0.5)
    mask = S >= tau
    assert mask.int().tolist() == [[1, 0, 1], [0, 1, 1]]
    _, value = router_similarity_loss(S, mask, None, divisor, off_diagonal)
    assert value.item() == pytest.approx(want, abs=1e-6)


def test_gating_functions():
    assert torch.equal(race_scores(S, "identity"), S)
    assert torch.allclose(race_scores(S, "sigmoid"), torch.sigmoid(S))
    assert torch.allclose(race_scores(S, "softmax"), torch.softmax(S, -1))


def make_router(**options) -> RaceRouter:
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=2, num_attention_heads=1,
                            num_moe_experts=3, moe_ffn_hidden_size=4, moe_router_topk=1,
                            moe_router_pre_softmax=True, add_bias_linear=False,
                            calculate_per_token_loss=True, use_cpu_initialization=True)
    groups = SimpleNamespace(tp=None, cp=None, tp_cp=None, dp_cp=None, tp_dp_cp=None)
    return RaceRouter(cfg, groups, **options)


def test_ema_threshold_per_step_and_batch_independent_evaluation():
    router = make_router(similarity_loss_coeff=0.0)
    router.train()
    router.routing(S)                                          # step 1: τ = .8
    router.after_step()
    assert router.threshold_ema.item() == pytest.approx(0.8)  # the first update sets τ_ema
    # step 2, two micro-batches: τ = .8 and τ = .3
    router.routing(S)
    assert router.routing_with_stats(S2)[2]["threshold"] == pytest.approx(0.3)
    router.after_step()
    # τ̄ = (.8 + .3)/2 = .55; τ_ema = .95·.8 + .05·.55 = .7875
    assert router.threshold_ema.item() == pytest.approx(0.7875)
    assert router.threshold_updates.item() == 2
    router.eval()
    with torch.no_grad():
        _, mask = router.routing(S)                            # .9 and .8 ≥ .7875; .7 is not
        assert mask.int().tolist() == [[1, 0, 0], [0, 1, 0]]
        _, alone = router.routing(S[1:])                       # the same token, batch of one
        assert torch.equal(alone, mask[1:])
    router.after_step()                                        # evaluation recorded nothing
    assert router.threshold_ema.item() == pytest.approx(0.7875)


def test_ema_momentum_option():
    router = make_router(ema_momentum=0.5, similarity_loss_coeff=0.0)
    router.train()
    router.routing(S)
    router.after_step()                                        # τ_ema = .8
    router.routing(S)
    router.routing(S2)
    router.after_step()                                        # τ̄ = .55 → .5·.8 + .5·.55
    assert router.threshold_ema.item() == pytest.approx(0.675)


def test_similarity_loss_gradient_is_coeff_times_tokens():
    """Attached like Megatron's aux losses under per-token loss: the backward adds
    coeff·N·∂L_sim/∂S (finalize_model_grads later divides everything by the token count)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    coeff = 0.1
    router = make_router(similarity_loss_coeff=coeff)
    router.train()
    logits = S.clone().requires_grad_()
    probs, mask, stats = router.routing_with_stats(logits)
    assert stats["similarity_loss"] == pytest.approx(0.362730, abs=1e-6)
    probs.sum().backward()
    ref = S.clone().requires_grad_()
    total = (ref * mask).sum() + coeff * 2 * router_similarity_loss(ref, mask)[0]
    total.backward()
    assert torch.allclose(logits.grad, ref.grad, atol=1e-7)
    assert not torch.allclose(logits.grad, mask.float())      # the loss does contribute
