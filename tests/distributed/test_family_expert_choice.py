"""Expert-choice routing under EP2 (DP2) and EP2×TP2 with sequence parallelism: the same loss,
step-1 gradients and parameters after 3 steps as the single-process reference. Its selection
group is the micro-batch, which the standard reference mirrors (it runs each DP rank's
micro-batch separately); under SP each TP rank holds a sequence shard and the per-expert
threshold is found over the whole micro-batch. Perturbing one expert on one rank must break it."""

import pytest

from megamoe.testing.parity import EP2, EP2_TP2, check_layout, reference

FAMILY = ["model.moe.router=expert_choice", "model.moe.aux_loss_coeff=0",
          "model.moe.z_loss_coeff=0", "model.moe.allow_non_causal=true"]
LAYOUTS = {"ep2": EP2, "ep2tp2": EP2_TP2}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_single_process(layout):
    check_layout(FAMILY, LAYOUTS[layout], reference(FAMILY, dp=2))
