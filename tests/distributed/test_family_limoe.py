"""LIMoE (V-MoE routing + per-modality entropy losses, synthetic modality ids) under EP2 and
EP2×TP2 with sequence parallelism: the entropy losses all-reduce their partial sums over the TP
group, so loss, gradients and parameters match the single-process reference; perturbing one
expert on one rank must break it."""

import pytest

from megamoe.testing.parity import EP2, EP2_TP2, check_layout, reference


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
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,overrides,layout", CASES,
                         ids=[f"{c[0]}-w{c[2][0]}" for c in CASES])
def test_limoe_matches_single_process(name, overrides, layout):
    ref = reference(overrides, dp=layout[2])
    check_layout(overrides, layout, ref)
