"""Race's per-layer regularisation on a diffusion target (papers.md §7 "Per-layer
regularization"): h = GELU(W_h·x), ŷ_t = W_y·h_t ∈ R^{p²·C}, and each image adds the mean of
(ŷ − y)² over its tokens and values (megamoe.moe.routers.race). A hand-computed vector, the
gradient the layer attaches (coeff × that loss, as Megatron's aux losses), and the sequence
split: the shares of two SP ranks, each holding half of every image's tokens, sum to the whole
(the normalisation uses the image's whole token count, not the shard's)."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from megamoe.blocks.context import Context
from megamoe.moe.routers.race import RaceRouter

G1 = 0.841344746068543       # GELU(1)


def make_router(coeff: float = 0.5, D: int = 2, P: int = 2) -> RaceRouter:
    from megatron.core.transformer import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=D, num_attention_heads=1,
                            num_moe_experts=2, moe_ffn_hidden_size=4, moe_router_topk=1,
                            moe_router_pre_softmax=True, add_bias_linear=False,
                            calculate_per_token_loss=True, use_cpu_initialization=True)
    groups = SimpleNamespace(tp=None, cp=None, tp_cp=None, dp_cp=None, tp_dp_cp=None)
    return RaceRouter(cfg, groups, similarity_loss_coeff=0.0, plr_coeff=coeff,
                      plr_regression_size=P)


# One image (B = 1) of S = 2 tokens, D = 2, P = 2 target values per token; W_h = I,
# W_y = [[1, 0], [1, 1]].
#   x₀ = (1, 0): h₀ = (g, 0), ŷ₀ = (g, g);    y₀ = (1, 0)
#   x₁ = (1, 1): h₁ = (g, g), ŷ₁ = (g, 2g);   y₁ = (0, 1)      g = GELU(1) = .841345
#   Σ (ŷ − y)² = (g − 1)² + g² + g² + (2g − 1)² = .025171 + .707861 + .707861 + .466065
#              = 1.906958;  L_PLR = 1.906958 / (S·P = 4) = .476740
X_SBD = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
Y_BSP = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
W_Y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])


def _hand_router(coeff=0.5):
    router = make_router(coeff)
    with torch.no_grad():
        router.plr_hidden.copy_(torch.eye(2))
        router.plr_target.copy_(W_Y)
    return router


def test_hand_vector():
    router = _hand_router()
    h_TD = router.plr_features(X_SBD)
    assert torch.allclose(h_TD, torch.tensor([[G1, 0.0], [G1, G1]]))
    share, err_sum = router.plr_regression_share(Context(targets_BSP=Y_BSP), h_TD, 2)
    assert err_sum.item() == pytest.approx(1.906958, abs=1e-6)
    assert share.item() == pytest.approx(0.476740, abs=1e-6)


def test_layer_attaches_coeff_times_the_loss():
    """route() in training: the backward of the combine weights adds coeff·∂L_PLR/∂θ (the
    router's own probabilities do not reach W_y); the head predicts the context's target."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    coeff = 0.5
    router = _hand_router(coeff)
    router.train()
    out = router.route(X_SBD, Context(targets_BSP=Y_BSP))
    assert out.stats["plr_loss"] == pytest.approx(1.906958 / 4, abs=1e-6)   # mean per value
    out.probs_TE.sum().backward()
    # ∂/∂W_y of coeff·Σ (W_y·h − y)² / 4 = coeff·Σ_t 2(ŷ_t − y_t) h_tᵀ / 4
    h = torch.tensor([[G1, 0.0], [G1, G1]])
    resid = h @ W_Y.t() - Y_BSP[0]
    want = coeff * 2 * resid.t() @ h / 4
    assert torch.allclose(router.plr_target.grad, want, atol=1e-6)
    assert router.plr_target.grad.abs().max() > 0.1
    # control: a target the head does not see would give another gradient
    other = _hand_router(coeff)
    other.train()
    other.route(X_SBD, Context(targets_BSP=Y_BSP + 1)).probs_TE.sum().backward()
    assert not torch.allclose(other.plr_target.grad, want, atol=1e-3)


def test_without_the_target_in_the_context_is_one_error():
    router = _hand_router()
    router.train()
    with pytest.raises(ValueError, match="targets_BSP"):
        router.route(X_SBD, Context())


def test_sequence_shards_sum_to_the_whole_micro_batch():
    """B = 2 images of S = 4 tokens: the shares of SP ranks 0 and 1 (tokens 0–1 and 2–3 of
    each image, Megatron's [S, B] order) sum to Σ_images mean((ŷ − y)²) computed per image
    from [B, S, P]; dividing by the shard's token count instead (the layout-dependent
    normalisation) would double it."""
    g = torch.Generator().manual_seed(0)
    B, S, D, P = 2, 4, 3, 5
    router = make_router(D=D, P=P)
    with torch.no_grad():
        router.plr_hidden.copy_(torch.randn(D, D, generator=g))
        router.plr_target.copy_(torch.randn(P, D, generator=g))
    x_SBD, y_BSP = torch.randn(S, B, D, generator=g), torch.randn(B, S, P, generator=g)
    context = Context(targets_BSP=y_BSP)
    want = sum(((F.linear(F.gelu(x_SBD[:, b] @ router.plr_hidden.t()), router.plr_target)
                 - y_BSP[b]) ** 2).mean() for b in range(B))
    shares = []
    router.sp_size = 2
    for rank in range(2):
        router.sp_rank = rank
        h_TD = router.plr_features(x_SBD[rank * 2:(rank + 1) * 2])
        shares.append(router.plr_regression_share(context, h_TD, S)[0])
        per_shard = router.plr_regression_share(context, h_TD, S // 2)[0]   # control
        assert per_shard.item() == pytest.approx(2 * shares[-1].item(), rel=1e-6)
    assert (shares[0] + shares[1]).item() == pytest.approx(want.item(), rel=1e-6)
    assert abs(shares[0].item() - shares[1].item()) > 1e-3    # the halves differ
