"""DiT-MoE (raw top-2, shared expert, expert-level balance loss) under EP2 and EP2×TP2 with
sequence parallelism: the same loss, step-1 gradients and parameters after 3 steps as the
single-process reference; perturbing one expert on one rank must break it."""

import pytest

from megamoe.testing.parity import compare, parity_task
from megamoe.testing.pool import run_distributed

FAMILY = ["model.moe.router=dit_moe", "model.moe.shared_expert_ffn_hidden_size=64",
            "model.moe.aux_loss_coeff=0.005"]
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
