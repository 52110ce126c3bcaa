"""Depth routers of Mixture-of-Recursions: papers.md §14 T6 (expert-choice) and T7
(token-choice), plus one hand-computed case of each.

Logits are set exactly by one-hot hidden states: with h_t = e_t (D = S) the linear router gives
z_t = θ[t] (θ[:, t] for token-choice)."""

import math

import pytest
import torch

from megamoe.mor.expert_choice import ExpertChoiceDepthRouter, capacity_schedule, tokens_kept
from megamoe.mor.token_choice import TokenChoiceDepthRouter


def expert_router(logits_per_step, S):
    router = ExpertChoiceDepthRouter(S, len(logits_per_step)).double()
    with torch.no_grad():
        for lin, z in zip(router.routers, logits_per_step):
            lin.weight.copy_(torch.tensor(z, dtype=torch.float64)[None])
    return router


def route_all(router, h_BSD):
    prev, steps = None, []
    for r in range(router.num_recursions):
        prev = router.step(r, h_BSD, prev)
        steps.append(prev)
    return steps


def test_t6_expert_choice():
    assert capacity_schedule(3) == [1.0, 2 / 3, 1 / 3]
    assert [tokens_kept(c, 6) for c in capacity_schedule(3)] == [6, 4, 2]
    assert [tokens_kept(c, 2048) for c in capacity_schedule(3)] == [2048, 1365, 682]
    # step-3 logits of the candidates [0, 2, 3, 4] are [0, −0.3, 1.2, 0.4]; the others unused
    router = expert_router([[0.3, -1, 2, 0, 1, -0.5], [0.5, -2, 1.5, 0.2, 0.9, 0.0],
                            [0, 9, -0.3, 1.2, 0.4, 9]], 6)
    router.train()
    steps = route_all(router, torch.eye(6, dtype=torch.float64)[None])
    assert steps[0].selected_BK.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert steps[1].selected_BK.tolist() == [[0, 2, 3, 4]]
    assert steps[2].selected_BK.tolist() == [[3, 4]]
    assert torch.allclose(steps[1].gate_BK, torch.tensor([[.062246, .081757, .054983, .071095]],
                                                         dtype=torch.float64), atol=1e-6)
    assert torch.allclose(steps[2].gate_BK, torch.tensor([[.076852, .059869]],
                                                         dtype=torch.float64), atol=1e-6)
    bce = [s.aux_loss.item() for s in steps]
    assert bce == pytest.approx([0.662505, 0.405810, 0.505950], abs=1e-6)
    assert sum(bce) == pytest.approx(1.574265, abs=1e-6)
    assert router.total_loss(steps).item() == pytest.approx(0.001574, abs=1e-6)


def test_expert_choice_by_hand_two_sequences_and_threshold_rule():
    # S = 4, N_r = 2, C = [1, 1/2] → k = [4, 2]. Sequence 0 step-2 logits [2, −1, 0, 1]:
    # kept {0, 3}; sequence 1 logits [−1, 3, 1, −2]: kept {1, 2}.
    # BCE_2 per token = softplus(−z) if kept else softplus(z):
    #   seq 0: sp(−2) + sp(−1) + sp(0) + sp(−1) = .126928 + .313262 + .693147 + .313262
    #   seq 1: sp(−1) + sp(−3) + sp(−1) + sp(−2) = .313262 + .048587 + .313262 + .126928
    # mean over B·N = 8 → 2.248638 / 8 = 0.281080
    sp = lambda z: math.log1p(math.exp(z))
    want = (sp(-2) + sp(-1) + sp(0) + sp(-1) + sp(-1) + sp(-3) + sp(-1) + sp(-2)) / 8
    assert want == pytest.approx(0.281080, abs=1e-6)
    S = 4
    router = ExpertChoiceDepthRouter(2 * S, 2).double()
    with torch.no_grad():
        router.routers[0].weight.zero_()
        router.routers[1].weight.copy_(torch.tensor([[2, -1, 0, 1, -1, 3, 1, -2]],
                                                    dtype=torch.float64))
    h = torch.zeros(2, S, 2 * S, dtype=torch.float64)
    h[0, :, :S] = torch.eye(S)
    h[1, :, S:] = torch.eye(S)
    router.train()
    steps = route_all(router, h)
    assert steps[1].selected_BK.tolist() == [[0, 3], [1, 2]]
    assert steps[1].aux_loss.item() == pytest.approx(want, abs=1e-9)
    assert steps[0].aux_loss.item() == pytest.approx(math.log(2), abs=1e-9)  # z = 0, all kept
    # inference: σ(z) > 0.5 ⇔ z > 0, except that a step of capacity 1 keeps every candidate:
    # step 1 (C = 1, z = 0) keeps all; step 2 keeps z > 0: w = [2, -1, 0, 1 | -1, 3, 1, -2]
    router.eval()
    steps = route_all(router, h)
    assert steps[0].valid_BK.sum().item() == 2 * S
    assert steps[1].selected_BK.tolist() == [[0, 3], [1, 2]]
    assert steps[1].valid_BK.tolist() == [[True, True], [True, True]]
    assert router.is_causal()
    # with C_1 < 1 the threshold applies at step 1 too: z = 0 keeps nobody, nothing goes deeper
    router.capacities = [0.5, 0.5]
    steps = route_all(router, h)
    assert steps[0].valid_BK.sum().item() == 0 and steps[1].valid_BK.sum().item() == 0
    with torch.no_grad():
        router.routers[0].weight.fill_(1.0)
    assert route_all(router, h)[1].selected_BK.tolist() == [[0, 3], [1, 2]]


def token_router(logits_TR, **kw):
    T, R = len(logits_TR), len(logits_TR[0])
    router = TokenChoiceDepthRouter(T, R, **kw).double()
    with torch.no_grad():
        router.router.weight.copy_(torch.tensor(logits_TR, dtype=torch.float64).T)
    return router


T7 = [[1, 0, -1], [0, 2, 0], [.5, .5, 1.5], [2, .1, 0]]


def test_t7_token_choice():
    router = token_router(T7)
    router.train()
    a = router(torch.eye(4, dtype=torch.float64)[None])
    assert a.depth_BS.tolist() == [[0, 1, 2, 0]]
    assert a.ratio_R.tolist() == [.5, .25, .25]
    assert a.balance_loss.item() == pytest.approx(1.080367, abs=1e-6)
    assert a.z_loss.item() == pytest.approx(4.067730, abs=1e-6)
    assert router.total_loss(a).item() == pytest.approx(0.1 * 1.080367 + 1e-5 * 4.067730,
                                                        abs=1e-7)
    router_1e3 = token_router(T7, z_loss_coeff=1e-3)      # the appendix caption's value
    assert router_1e3.total_loss(a).item() == pytest.approx(0.108037 + 0.004068, abs=1e-6)
    free = token_router(T7, balancing="loss_free")
    free.train()
    b = free(torch.eye(4, dtype=torch.float64)[None])
    assert b.balance_loss.item() == 0.0
    assert free.update_bias().tolist() == pytest.approx([-0.001, 0.001, 0.001])
    assert free.router_bias.tolist() == pytest.approx([-0.001, 0.001, 0.001])
    assert free.ratio_count.item() == 0             # the accumulator restarts


def test_token_choice_by_hand_bias_changes_selection_not_gate():
    # 2 tokens, N_r = 2, logits [ln 3, 0] and [0, ln 3]: softmax [.75, .25] and [.25, .75];
    # depths [0, 1]; f = 2·[.5, .5], P = [.5, .5] → L_bal = 2·(.5·.5 + .5·.5) = 1.0;
    # lse = ln 4 for both → z-loss = (ln 4)² = 1.921812.
    l3 = math.log(3)
    router = token_router([[l3, 0], [0, l3]], balancing="loss_free")
    router.train()
    a = router(torch.eye(2, dtype=torch.float64)[None])
    assert a.depth_BS.tolist() == [[0, 1]]
    assert a.gate_BS.tolist()[0] == pytest.approx([.75, .75])
    assert a.z_loss.item() == pytest.approx(math.log(4) ** 2)
    assert token_router([[l3, 0], [0, l3]])(torch.eye(2, dtype=torch.float64)[None]) \
        .balance_loss.item() == pytest.approx(1.0)
    # two micro-batches with ratios [1, 0] and [.5, .5] → mean ratio [.75, .25], ε = ±.25
    router.ratio_sum.zero_()
    router.ratio_count.zero_()
    router(torch.tensor([[[1.0, 0], [1.0, 0]]], dtype=torch.float64))
    router(torch.eye(2, dtype=torch.float64)[None])
    assert router.update_bias().tolist() == pytest.approx([-0.001, 0.001])
    # a bias of .6 on depth 0 moves token 1 (g = [.25, .75]) to depth 0, gate stays unbiased
    with torch.no_grad():
        router.router_bias.copy_(torch.tensor([0.6, 0.0]))
    a = router(torch.eye(2, dtype=torch.float64)[None])
    assert a.depth_BS.tolist() == [[0, 0]]
    assert a.gate_BS.tolist()[0] == pytest.approx([.75, .25])
