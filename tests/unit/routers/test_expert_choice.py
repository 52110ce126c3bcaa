"""Expert-choice routing (Zhou et al. 2022): a hand-computed example (papers.md §14 has none),
the capacity rule, gradients through the combine weights, and the exact group-wide k-th largest
value (`token_groups.kth_largest`) that both expert choice and Expert Race select with."""

import math

import pytest
import torch

from megamoe.moe.routers.expert_choice import expert_capacity, expert_choice, expert_choice_stats
from megamoe.moe.routers.token_groups import (
    RADIX_SHIFTS,
    byte_histogram,
    descend,
    kth_largest,
    ordered_keys,
    values_from_keys,
)

# T = 5 tokens, E = 3 experts, k = 1. Logits are logs of the numbers below, so the softmax over
# experts is each row divided by its sum:
#   t0 ln[4, 4, 2]    / 10 -> [.40, .40, .20]
#   t1 ln[8, 1, 1]    / 10 -> [.80, .10, .10]
#   t2 ln[1, 3, 6]    / 10 -> [.10, .30, .60]
#   t3 ln[1, 2, 1]    / 4  -> [.25, .50, .25]
#   t4 ln[19, 19, 12] / 50 -> [.38, .38, .24]
EXP_LOGITS = torch.tensor([[4, 4, 2], [8, 1, 1], [1, 3, 6], [1, 2, 1], [19, 19, 12]],
                          dtype=torch.float64)
SCORES = [[.40, .40, .20], [.80, .10, .10], [.10, .30, .60], [.25, .50, .25], [.38, .38, .24]]
# capacity c = ⌈k·T/E⌉ = ⌈5/3⌉ = 2 tokens per expert. Each column sorted:
#   e0: t1 .80, t0 .40 | t4 .38, t3 .25, t2 .10  -> {t1, t0}
#   e1: t3 .50, t0 .40 | t4 .38, t2 .30, t1 .10  -> {t3, t0}
#   e2: t2 .60, t3 .25 | t4 .24, t0 .20, t1 .10  -> {t2, t3}
# so t0 and t3 get two experts, t1 and t2 one, t4 none (6 assignments = E·c); the combine
# weight is the token's score for that expert:
EXPECTED_MAP = [[1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 1], [0, 0, 0]]
EXPECTED_PROBS = [[.40, .40, 0], [.80, 0, 0], [0, 0, .60], [0, .50, .25], [0, 0, 0]]


def test_hand_computed_expert_choice():
    scores = torch.softmax(EXP_LOGITS.log(), dim=-1).float()
    assert torch.allclose(scores, torch.tensor(SCORES), atol=1e-6)
    capacity = expert_capacity(num_tokens=5, num_experts=3, k=1)
    assert capacity == 2
    probs, routing_map = expert_choice(scores, capacity)
    assert routing_map.int().tolist() == EXPECTED_MAP
    assert torch.allclose(probs, torch.tensor(EXPECTED_PROBS), atol=1e-6)
    assert routing_map.sum(0).tolist() == [2, 2, 2]           # every expert exactly full
    assert routing_map.sum(1).tolist() == [2, 1, 1, 2, 0]     # 0..E experts per token
    stats = expert_choice_stats(scores, routing_map, k=1)
    assert stats["dropped_fraction"] == pytest.approx(1 / 5)  # t4 got no expert
    assert stats["experts_per_token"] == pytest.approx(6 / 5)


@pytest.mark.parametrize("T,E,k,c", [(5, 3, 1, 2), (4, 3, 1, 2), (128, 4, 2, 64), (6, 4, 3, 5),
                                     (7, 7, 7, 7)])
def test_capacity_is_k_tokens_over_experts_rounded_up(T, E, k, c):
    assert expert_capacity(T, E, k) == c == min(T, math.ceil(k * T / E))


def test_gradient_reaches_the_chosen_scores_only():
    logits = EXP_LOGITS.log().float().requires_grad_()
    scores = torch.softmax(logits, dim=-1)
    probs, routing_map = expert_choice(scores, 2)
    upstream = torch.arange(15, dtype=torch.float32).view(5, 3)
    (probs * upstream).sum().backward()
    # d/dlogits of Σ_{(t,e) chosen} u_te·s_te = s ⊙ (u·m − Σ_e u_te·m_te·s_te) per token
    s, m = scores.detach(), routing_map.float()
    um = upstream * m
    want = s * (um - (um * s).sum(-1, keepdim=True))
    assert torch.allclose(logits.grad, want, atol=1e-6)
    assert torch.all(logits.grad[4] == 0)                   # t4 has no expert


def test_more_experts_per_token_with_larger_k():
    scores = torch.softmax(EXP_LOGITS.log(), dim=-1).float()
    _, routing_map = expert_choice(scores, expert_capacity(5, 3, 2))   # c = ⌈10/3⌉ = 4
    assert routing_map.sum(0).tolist() == [4, 4, 4]
    # e0 drops only t2 (.10), e1 only t1 (.10), e2 only t1 (.10): t1 keeps e0 alone
    assert routing_map.sum(1).tolist() == [3, 1, 2, 3, 3]


def test_kth_largest_matches_sorting_ties_and_signs_included():
    g = torch.Generator().manual_seed(0)
    for trial in range(100):
        N, C = (int(x) for x in torch.randint(1, 40, (2,), generator=g))
        C = C % 4 + 1
        values = torch.randn(N, C, generator=g) * 10.0 ** (trial % 7 - 3)
        if trial % 3 == 0:
            values = torch.randint(-3, 3, (N, C), generator=g).float()     # many ties
        if trial % 5 == 0:
            values[0, 0], values[-1, -1] = -0.0, float("inf")
        k = torch.randint(1, N + 1, (C,), generator=g)
        want = torch.stack([values[:, c].sort(descending=True).values[k[c] - 1]
                            for c in range(C)])
        assert torch.equal(kth_largest(values, k), want), (values, k)


def test_kth_largest_over_pieces_is_the_whole_answer():
    """What the ranks of a group compute: their histograms add up (the all-reduce), so each
    rank finds the k-th largest of the concatenation without gathering it. Two ranks simulated
    in lock step."""
    g = torch.Generator().manual_seed(1)
    whole = torch.randn(30, 3, generator=g)
    whole[3, 1] = whole[20, 1]                                  # a tie across the pieces
    k = torch.tensor([7, 1, 30])
    keys = [ordered_keys(piece) for piece in (whole[:11], whole[11:])]
    prefix, remaining = torch.zeros(3, dtype=torch.int64), k.clone()
    for shift in RADIX_SHIFTS:
        hist = sum(byte_histogram(key, prefix, shift) for key in keys)    # the all-reduce
        prefix, remaining = descend(hist, prefix, remaining)
    want = torch.stack([whole[:, c].sort(descending=True).values[k[c] - 1] for c in range(3)])
    assert torch.equal(values_from_keys(prefix), want)
    assert torch.equal(kth_largest(whole, k), want)
