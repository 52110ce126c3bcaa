"""The vlm family on packed sequences (data.packing: two samples per row, block-diagonal
causal attention, per-sample positions) under expert and data parallelism (EP 2 over two DP
ranks): the same answer-token loss, step-1 gradients and parameters after 3 steps as one
process that sees both ranks' packed micro-batches; one expert perturbed on one rank breaks it."""

import pytest

from megamoe.testing.parity import check_layout, reference, vlm_parity_task

# two samples of up to 28 tokens per row (tests/unit/test_vlm_packing.py)
PACKED = ["data.packing=true", "data.pack_samples=2", "model.seq_length=58"]


@pytest.mark.timeout(600)
def test_packed_vlm_matches_single_process_under_ep2_dp2():
    ref = reference(PACKED, dp=2, task=vlm_parity_task)
    assert any(k.startswith("vision.") for k in ref.grads)
    assert ref.losses[0] > 0 and ref.losses[-1] < ref.losses[0] * 1.5
    check_layout(PACKED, (2, ["parallel.expert=2"], 2), ref, task=vlm_parity_task, perturb=True)
