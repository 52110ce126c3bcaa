"""LIMoE (V-MoE routing + per-modality entropy losses, synthetic modality ids) under EP2 and
EP2×TP2 with sequence parallelism: the entropy losses all-reduce their partial sums over the TP
group, so loss, gradients and parameters match the single-process reference; perturbing one
expert on one rank must break it."""

import pytest

from megamoe.testing.parity import compare, parity_task
from megamoe.testing.pool import run_distributed

EP2 = (2, ["parallel.expert=2"], 2)
EP2_TP2 = (4, ["parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=1"], 1)

# large coefficients and a threshold that is active for one modality, inactive for the other
LIMOE = ["model.moe.router=limoe", "model.moe.z_loss_coeff=0", "data.synthetic_modalities=3",
         "model.moe.vmoe.capacity_ratio=null",
         "model.moe.limoe.local_coeff=[0.5,0.0,0.3]", "model.moe.limoe.global_coeff=[0.5,0.4,0.2]",
         "model.moe.limoe.global_threshold=[null,1.0,0.1]"]
CASES = [("dropless", LIMOE, EP2), ("dropless", LIMOE, EP2_TP2),
         ("top1", LIMOE + ["model.moe.topk=1"], EP2_TP2),
         ("capacity_bpr", LIMOE + ["model.moe.vmoe.capacity_ratio=1.0",
                                   "model.moe.vmoe.priority=sum",
                                   "model.moe.allow_non_causal=true"], EP2_TP2)]
_REFERENCES = {}


def reference(dp: int, overrides: list):
    key = (dp, tuple(overrides))
    if key not in _REFERENCES:
        _REFERENCES[key] = run_distributed(parity_task, 1, overrides, reference_dp=dp)[0]
    return _REFERENCES[key]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,overrides,layout", CASES,
                         ids=[f"{c[0]}-w{c[2][0]}" for c in CASES])
def test_limoe_matches_single_process(name, overrides, layout):
    world, parallel, dp = layout
    ref = reference(dp, overrides)
    got = run_distributed(parity_task, world, overrides + parallel)[0]
    problems = compare(ref, got)
    assert not problems, "\n".join(problems[:20])
    bad = run_distributed(parity_task, world, overrides + parallel, perturb=True)[0]
    assert compare(ref, bad), "perturbed expert went unnoticed"
