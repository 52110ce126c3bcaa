"""Soft MoE (each sequence's slots mix its positions; under TP+SP the sequences are gathered over
the TP group) under EP2 and EP2×TP2 with sequence parallelism: the same loss, step-1 gradients
and parameters after 3 steps as the single-process reference; perturbing one expert on one rank
must break it."""

import pytest

from megamoe.testing.parity import EP2, EP2_TP2, check_layout, compare, parity_task, reference
from megamoe.testing.pool import run_distributed

FAMILY = ["model.moe.router=soft", "model.moe.allow_non_causal=true"]
LAYOUTS = {"ep2": EP2, "ep2tp2": EP2_TP2}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_single_process(layout):
    check_layout(FAMILY, LAYOUTS[layout], reference(FAMILY, dp=2))


def parity_without_slot_grad_reduction(*args, **kwargs):
    """`parity_task` with the slot parameters' TP reduction switched off (not marked
    `sequence_parallel`): each TP rank keeps only its partial gradient."""
    from megamoe.moe.routers.soft import SoftRouter

    init = SoftRouter.__init__

    def unmarked(self, *a, **kw):
        init(self, *a, **kw)
        for p in self.parameters():
            p.sequence_parallel = False

    SoftRouter.__init__ = unmarked
    try:
        return parity_task(*args, **kwargs)
    finally:
        SoftRouter.__init__ = init


@pytest.mark.timeout(600)
def test_partial_slot_gradients_are_caught_under_tp():
    world, parallel, _ = LAYOUTS["ep2tp2"]
    got = run_distributed(parity_without_slot_grad_reduction, world, FAMILY + parallel)[0]
    problems = compare(reference(FAMILY, dp=2), got)
    assert any("grad decoder.layers.mlp.router.weight" in p for p in problems), problems
