"""Grouped experts under EP2 match the single-process run of Megatron's sequential experts
(DESIGN.md tolerances; one expert perturbed on one rank must break it), dropless and capacity."""

import pytest

from megamoe.testing.parity import EP2, check_layout, reference

GROUPED = ["model.moe.experts=grouped"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", [[], ["model.moe.capacity_factor=1.0"]],
                         ids=["dropless", "capacity"])
def test_grouped_ep2_matches_sequential_single_process(mode):
    ref = reference(mode + ["model.moe.experts=sequential"], dp=EP2[2])
    check_layout(GROUPED + mode, EP2, ref)
