"""MoEE soft mixing (every token to every expert) under EP2 and EP2×TP2 with sequence parallelism:
the same loss, step-1 gradients and parameters after 3 steps as the single-process reference;
perturbing one expert on one rank must break it."""

import pytest

from megamoe.testing.parity import EP2, EP2_TP2, check_layout, reference

FAMILY = ["model.moe.router=moee", "model.moe.topk=4"]
LAYOUTS = {"ep2": EP2, "ep2tp2": EP2_TP2}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_single_process(layout):
    check_layout(FAMILY, LAYOUTS[layout], reference(FAMILY, dp=2))
