"""Token-choice top-k variants: papers.md §14 T1 (Switch aux and z-loss), T2 (capacity),
T8 (loss-free bias), T12 (DiT-MoE balance = Megatron's Switch loss with raw top-k scores), and
hand-computed selections."""

import math

import pytest
import torch

from megatron.core.transformer.moe.moe_utils import (
    get_capacity,
    switch_load_balancing_loss_func,
    z_loss_func,
)

from megamoe.moe.routers.topk import loss_free_update, scores_for, select_topk

T1_LOGITS = torch.tensor([[2, 1, 0], [0.5, 2.5, 0], [1, 0, 3], [0, 0.2, 0.1]])


def switch_loss(logits, k, renormalize=False):
    scores = scores_for(logits, "softmax")
    _, routing_map = select_topk(scores, k, renormalize)
    return switch_load_balancing_loss_func(scores, routing_map.sum(0), logits.shape[0], k,
                                           logits.shape[1], moe_aux_loss_coeff=1.0)


def test_t1_switch_aux_and_z_loss():
    assert switch_loss(T1_LOGITS, 1).item() == pytest.approx(1.026621, abs=1e-6)
    assert z_loss_func(T1_LOGITS, 1.0).item() == pytest.approx(6.140383, abs=1e-6)


def test_t2_switch_capacity():
    assert get_capacity(num_tokens=1024, num_experts=8, capacity_factor=1.25) == 160


def test_t8_loss_free_sign_rule():
    new = loss_free_update(torch.zeros(3), torch.tensor([5.0, 1.0, 2.0]), 0.001)
    assert torch.allclose(new, torch.tensor([-0.001, 0.001, 0.001]))


def test_t12_dit_moe_expert_level_balance():
    logits = torch.tensor([[1, .5, 0, -1], [0, 0, 2, 1], [.3, .2, .1, 0]])
    assert switch_loss(logits, 2).item() == pytest.approx(0.994779, abs=1e-6)
    assert 0.005 * switch_loss(logits, 2).item() == pytest.approx(0.004974, abs=1e-6)


def test_renormalisation_switch_by_hand():
    # softmax of [ln 4, ln 2, 0] = [4/7, 2/7, 1/7]; top-2 = experts 0 and 1
    logits = torch.tensor([[math.log(4), math.log(2), 0.0]])
    raw, chosen = select_topk(scores_for(logits, "softmax"), 2, renormalize=False)
    assert torch.allclose(raw, torch.tensor([[4 / 7, 2 / 7, 0]]))
    assert chosen.tolist() == [[True, True, False]]
    norm, _ = select_topk(scores_for(logits, "softmax"), 2, renormalize=True)
    assert torch.allclose(norm, torch.tensor([[2 / 3, 1 / 3, 0]]))
    # sigmoid scores σ(0) = 0.5, σ(ln 3) = 0.75: raw keeps them, renormalised sums to 1
    sig = scores_for(torch.tensor([[0.0, math.log(3), -5.0]]), "sigmoid")
    raw, _ = select_topk(sig, 2, renormalize=False)
    assert torch.allclose(raw, torch.tensor([[0.5, 0.75, 0]]))
    norm, _ = select_topk(sig, 2, renormalize=True)
    assert torch.allclose(norm, torch.tensor([[0.4, 0.6, 0]]))


def test_bias_changes_selection_not_weights():
    scores = scores_for(torch.tensor([[math.log(4), math.log(2), 0.0]]), "softmax")
    probs, chosen = select_topk(scores, 1, renormalize=False, bias_E=torch.tensor([0, 0.3, 0]))
    assert chosen.tolist() == [[False, True, False]]          # 2/7 + 0.3 > 4/7
    assert probs[0, 1].item() == pytest.approx(2 / 7)         # weight: the unbiased score


def test_top1_keeps_the_score_so_the_router_learns():
    scores = scores_for(torch.tensor([[math.log(4), math.log(2), 0.0]]), "softmax")
    probs, _ = select_topk(scores, 1, renormalize=True)
    assert probs[0, 0].item() == pytest.approx(4 / 7)       # Switch: p, not 1
