"""V-MoE routing: papers.md §14 T2 (capacity 104), T3 (importance loss), T4 (load loss), T5
(Batch Prioritized Routing), and hand-computed buffer orders, priorities and noise layout; at
B ≥ 2 the buffers fill in the reference's batch order (image by image), each case with the old
position-major answer as its negative control."""

import math

import pytest
import torch

from megamoe.moe.routers.vmoe import (
    assign_buffers,
    cv_squared,
    load_probabilities,
    noise_seed,
    token_noise,
    vmoe_capacity,
)

T1_LOGITS = torch.tensor([[2, 1, 0], [0.5, 2.5, 0], [1, 0, 3], [0, 0.2, 0.1]])


def test_t2_capacity():
    assert vmoe_capacity(1576, k=2, capacity_ratio=1.05, num_experts=32) == 104
    # by hand: ceil(10·1·1.0/4) = 3, rounded up to a multiple of 4 = 4 (or kept at 3)
    assert vmoe_capacity(10, 1, 1.0, 4, multiple_of=4) == 4
    assert vmoe_capacity(10, 1, 1.0, 4, multiple_of=1) == 3


def test_t3_importance_loss():
    importance = torch.softmax(T1_LOGITS, dim=-1).sum(0)
    assert torch.allclose(importance, torch.tensor([1.191211, 1.475313, 1.333476]), atol=1e-6)
    assert cv_squared(importance).item() == pytest.approx(0.007567, abs=1e-6)
    # by hand: Imp = [2, 1, 1]: mean 4/3, var 2/9 → CV² = 1/8
    assert cv_squared(torch.tensor([2.0, 1.0, 1.0])).item() == pytest.approx(0.125)


def test_t4_load_loss():
    noise = torch.tensor([[.1, -.2, 0], [0, .1, -.1], [-.2, 0, .1], [.05, -.05, .2]])
    p = load_probabilities(T1_LOGITS, T1_LOGITS + noise, k=1, sigma=1 / 3)
    expected = torch.tensor([[.382089, .000483, 0], [0, .382089, 0], [0, 0, .382089],
                             [.184060, .382089, .274253]])
    assert torch.allclose(p, expected, atol=1e-6)
    load = p.mean(0)
    assert torch.allclose(load, torch.tensor([.141537, .191165, .164085]), atol=1e-6)
    assert cv_squared(load).item() == pytest.approx(0.015011, abs=1e-6)


def test_load_probability_by_hand():
    # k = 2 of logits [0, 0, 0] with noisy [1, 0, −1]: η = 0 → p = 1 − Φ(0) = 0.5 everywhere
    p = load_probabilities(torch.zeros(1, 3), torch.tensor([[1.0, 0.0, -1.0]]), k=2, sigma=0.5)
    assert torch.allclose(p, torch.full((1, 3), 0.5))


T5_GATES = torch.tensor([[.6, .4], [.55, .45], [.9, .1], [.2, .8]])


def test_t5_batch_prioritized_routing():
    experts, kept = assign_buffers(T5_GATES, k=1, capacity=1, priority="none")
    assert experts[:, 0].tolist() == [0, 0, 0, 1]
    assert kept[:, 0].tolist() == [True, False, False, True]      # t0→e0, t3→e1
    experts, kept = assign_buffers(T5_GATES, k=1, capacity=1, priority="max")
    assert kept[:, 0].tolist() == [False, False, True, True]      # t2→e0, t3→e1


def test_top1_choices_fill_before_top2_choices():
    # top-1: t0→e0, t1→e0, t2→e1; top-2: t0→e1, t1→e1, t2→e0; capacity 2:
    # e0 = [t0, t1] (t2's 2nd choice overflows), e1 = [t2, t0] (t1's 2nd choice overflows)
    gates = torch.tensor([[.7, .3], [.6, .4], [.2, .8]])
    experts, kept = assign_buffers(gates, k=2, capacity=2)
    assert experts.tolist() == [[0, 1], [0, 1], [1, 0]]
    assert kept.tolist() == [[True, True], [True, False], [True, False]]


def test_priority_max_and_sum_differ():
    # t0: max .5, top-2 sum .95; t1: max .55, sum .90 → e0's one slot goes to t1 (max) or
    # t0 (sum); the top-2 choices e1 (t0) and e2 (t1) have room either way
    gates = torch.tensor([[.5, .45, .05], [.55, .10, .35]])
    _, kept = assign_buffers(gates, k=2, capacity=1, priority="max")
    assert kept.tolist() == [[False, True], [True, True]]
    _, kept = assign_buffers(gates, k=2, capacity=1, priority="sum")
    assert kept.tolist() == [[True, True], [False, True]]


def test_noise_is_a_function_of_the_global_position():
    keys = (0, 3, 2)                            # (seed, step, layer)
    full = token_noise(keys, first_sample=4, B=2, S=6, E=3)
    # sequence-parallel shards (2 ranks × 3 positions) are the rows of the full draw
    halves = [token_noise(keys, 4, 2, 3, 3, sp_rank=r, sp_size=2) for r in range(2)]
    assert torch.equal(torch.cat(halves), full)
    # two micro-batches of 1 sample (DP ranks, or the reference's order) = one of 2 samples
    one = [token_noise(keys, 4 + i, 1, 6, 3) for i in range(2)]
    assert torch.equal(torch.stack(one, dim=1).reshape(12, 3), full)
    assert not torch.equal(token_noise((0, 4, 2), 4, 2, 6, 3), full)     # next step differs
    assert noise_seed(1, 2, 3) != noise_seed(1, 3, 2) and 0 <= noise_seed(7) < 2 ** 63
    assert abs(full.std().item() - 1) < 0.5 and math.isfinite(full.sum().item())


# Batch order at B = 2 (S = 2 positions, E = 2, k = 1, capacity 1 per expert). Megatron's order
# t = s·B + b: t0 = (s0, b0), t1 = (s0, b1), t2 = (s1, b0), t3 = (s1, b1); the reference's batch
# order (image by image) is t0, t2, t1, t3.
# Top-1 choices: t0 → e1, t1 → e0, t2 → e0, t3 → e0.
# Batch order: t0 takes e1, t2 takes e0, t1 and t3 overflow → kept [T, F, T, F].
# The old position-major rule: t0 takes e1, t1 takes e0, t2 and t3 overflow → [T, T, F, F].
B2_GATES = torch.tensor([[.3, .7], [.6, .4], [.8, .2], [.9, .1]])


def test_buffers_fill_in_batch_order_at_b2():
    experts, kept = assign_buffers(B2_GATES, k=1, capacity=1, priority="none", batch=2)
    assert experts[:, 0].tolist() == [1, 0, 0, 0]
    assert kept[:, 0].tolist() == [True, False, True, False]
    # negative control: the old position-major order keeps another token
    _, old = assign_buffers(B2_GATES, k=1, capacity=1, priority="none", batch=1)
    assert old[:, 0].tolist() == [True, True, False, False]


def test_batch_order_at_b3_with_top2_choices():
    # S = 2, B = 3: Megatron order t = s·3 + b; batch order t0, t3, t1, t4, t2, t5.
    # Every token prefers e0 (top-1), then e1 (top-2); capacity 2 per expert.
    # e0 gets the first two top-1 choices in batch order: t0 (s0,b0), t3 (s1,b0);
    # e1 gets the first two top-2 choices: again t0, t3. Sample 0 keeps everything, samples 1
    # and 2 lose both choices. Old order: t0, t1 (both s0) would have kept.
    gates = torch.tensor([[.6, .4]] * 6)
    _, kept = assign_buffers(gates, k=2, capacity=2, priority="none", batch=3)
    assert kept.tolist() == [[True, True], [False, False], [False, False],
                             [True, True], [False, False], [False, False]]
    _, old = assign_buffers(gates, k=2, capacity=2, priority="none", batch=1)
    assert old[:, 0].tolist() == [True, True, False, False, False, False]


def test_priority_ties_break_in_batch_order():
    # B = 2, S = 2 as above; t1 = (s0, b1) and t2 = (s1, b0) tie at priority .8 for e0 and
    # outrank the rest; capacity 1: the reference's stable sort keeps the batch-order first,
    # t2 (sample 0); ranked in Megatron order, t1 would win.
    gates = torch.tensor([[.3, .7], [.8, .2], [.8, .2], [.4, .6]])
    _, kept = assign_buffers(gates, k=1, capacity=1, priority="max", batch=2)
    assert kept[:, 0].tolist() == [True, False, True, False]
    _, old = assign_buffers(gates, k=1, capacity=1, priority="max", batch=1)
    assert old[:, 0].tolist() == [True, True, False, False]


def test_router_select_passes_the_batch():
    """`VMoERouter.select` decides over the micro-batch in its batch order (one rank)."""
    from types import SimpleNamespace

    from megamoe.moe.routers.token_groups import SequenceShards
    from megamoe.moe.routers.vmoe import VMoERouter

    router = SimpleNamespace(capacity_ratio=0.5, eval_capacity_ratio=0.5, training=False,
                             shards=SequenceShards(None), topk=1, capacity_multiple_of=1,
                             priority="none")
    # capacity ceil(4·1·0.5/2) = 1, the B2_GATES case
    experts, kept = VMoERouter.select(router, B2_GATES, 2)
    assert kept[:, 0].tolist() == [True, False, True, False]


def test_hf_remote_buffers_equal_megamoe():
    """The exported model's eval routing (hf_remote) fills buffers like megamoe, B = 3."""
    from megamoe.checkpoint.hf_remote.routers_megamoe import assign_buffers as hf_assign

    gates = torch.softmax(torch.randn(24, 4, generator=torch.Generator().manual_seed(0)), -1)
    for priority in ("none", "max", "sum"):
        ours = assign_buffers(gates, 2, 3, priority, batch=3)
        theirs = hf_assign(gates, 2, 3, priority, 3)
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    # negative control: these gates drop other tokens in Megatron's order
    old = hf_assign(gates, 2, 3, "none", 1)[1]
    assert not torch.equal(old, assign_buffers(gates, 2, 3, "none", batch=3)[1])
