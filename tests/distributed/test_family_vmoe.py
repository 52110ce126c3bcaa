"""V-MoE under expert parallelism and EP×TP with sequence parallelism: the same loss, step-1
gradients, parameters after 3 steps and router state (noise step) as the single-process
reference. Capacity with batch priority, or in batch order without it, selects over the
micro-batch (gathered over the TP group under SP), the noise is a function of the global token
position, and the importance and load losses use all-reduced partial sums; perturbing one
expert on one rank must break it."""

import pytest

from megamoe.testing.parity import EP2, EP2_TP2, check_layout, reference


VMOE = ["model.moe.router=vmoe", "model.moe.z_loss_coeff=0", "model.moe.allow_non_causal=true",
        "model.moe.vmoe.capacity_ratio=0.75", "model.moe.vmoe.priority=max",
        # large losses so that a wrong scale or a missing rank's share shows in the gradients
        "model.moe.vmoe.importance_loss_coeff=0.5", "model.moe.vmoe.load_loss_coeff=0.5"]
CASES = [("bpr_max", VMOE, EP2), ("bpr_max", VMOE, EP2_TP2),
         # no priority: buffers fill in batch order over the sequence gathered under SP
         ("capacity_batch_order",
          [o for o in VMOE if "priority" not in o] + ["model.moe.vmoe.priority=none"], EP2_TP2),
         ("dropless", VMOE + ["model.moe.vmoe.capacity_ratio=null",
                                  "model.moe.vmoe.priority=none"], EP2_TP2)]
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,overrides,layout", CASES,
                         ids=[f"{c[0]}-w{c[2][0]}" for c in CASES])
def test_vmoe_matches_single_process(name, overrides, layout):
    ref = reference(overrides, dp=layout[2])
    assert any(k.endswith("noise_step") for k in ref.router_state)
    check_layout(overrides, layout, ref)
