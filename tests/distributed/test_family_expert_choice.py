"""Expert-choice routing under EP2 (DP2) and EP2×TP2 with sequence parallelism: the same loss,
step-1 gradients and parameters after 3 steps as the single-process reference. Its selection
group is the micro-batch, which the standard reference mirrors (it runs each DP rank's
micro-batch separately); under SP each TP rank holds a sequence shard and the per-expert
threshold is found over the whole micro-batch. Perturbing one expert on one rank must break it."""

import pytest

from megamoe.testing.parity import compare, parity_task
from megamoe.testing.pool import run_distributed

FAMILY = ["model.moe.router=expert_choice", "model.moe.aux_loss_coeff=0",
          "model.moe.z_loss_coeff=0", "model.moe.allow_non_causal=true"]
LAYOUTS = {"ep2": (2, ["parallel.expert=2"]),
           "ep2tp2": (4, ["parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=1"])}
_REFERENCE = {}


def reference():
    if not _REFERENCE:
        _REFERENCE["ref"] = run_distributed(parity_task, 1, FAMILY, reference_dp=2)[0]
    return _REFERENCE["ref"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_single_process(layout):
    world, parallel = LAYOUTS[layout]
    got = run_distributed(parity_task, world, FAMILY + parallel)[0]
    problems = compare(reference(), got)
    assert not problems, "\n".join(problems[:20])
    bad = run_distributed(parity_task, world, FAMILY + parallel, perturb=True)[0]
    assert compare(reference(), bad), "perturbed expert went unnoticed"
