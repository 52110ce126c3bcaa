"""Modality experts: VLMo deterministic routing (with the VL expert in the top layers) and
Uni-MoE pools with top-k inside the pool, softmax over the selected logits; hand-computed."""

import math

import pytest
import torch

from megamoe.moe.routers.modality import pool_mask, pool_topk, vlmo_experts


def test_vlmo_routes_by_modality_then_to_the_vl_expert():
    modality = torch.tensor([0, 1, 1, 0])
    assert vlmo_experts(modality, 2, vl_layer=False).tolist() == [0, 1, 1, 0]
    assert vlmo_experts(modality, 2, vl_layer=True).tolist() == [2, 2, 2, 2]


def test_pool_mask():
    assert pool_mask([1, 3], 4).tolist() == [[True, False, False, False],
                                             [False, True, True, True]]


def test_pools_top2_softmax_over_selected_logits():
    # logits [1, 2, 3, 0], pools {0,1} and {2,3}
    # modality 0: experts 1, 0 with softmax([2, 1]) = [e/(1+e), 1/(1+e)] = [.731059, .268941]
    # modality 1: experts 2, 3 with softmax([3, 0]) = [.952574, .047426]
    logits = torch.tensor([[1.0, 2, 3, 0], [1.0, 2, 3, 0]])
    allowed = pool_mask([2, 2], 4)[torch.tensor([0, 1])]
    probs, routing_map = pool_topk(logits, allowed, k=2)
    assert torch.allclose(probs, torch.tensor([[.268941, .731059, 0, 0],
                                               [0, 0, .952574, .047426]]), atol=1e-6)
    assert routing_map.tolist() == [[True, True, False, False], [False, False, True, True]]


def test_pools_top1_weight_is_one_and_gradient_flows():
    logits = torch.tensor([[0.5, -1.0, 4.0]], requires_grad=True)
    allowed = pool_mask([2, 1], 3)[torch.tensor([0])]          # pool {0, 1}: 4.0 is excluded
    probs, routing_map = pool_topk(logits, allowed, k=1)
    assert probs.tolist() == [[1.0, 0.0, 0.0]] and routing_map[0, 0]
    probs, _ = pool_topk(logits, pool_mask([3], 3)[torch.tensor([0])], k=2)
    w = math.exp(4) / (math.exp(4) + math.exp(0.5))
    assert probs[0, 2].item() == pytest.approx(w)
    probs.sum().backward()                                      # Σ of a softmax: zero gradient
    assert logits.grad is not None and logits.grad.abs().max() < 1e-6
