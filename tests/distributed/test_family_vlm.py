"""The vlm family (vit encoder → connector → MoE LM on the generated scenes) under expert,
tensor + sequence, pipeline and data parallelism: the same answer-token loss, step-1 gradients
(encoder, connector and LM), parameters after 3 steps and grad norms as the single-process
reference that sees every DP rank's samples. Negative controls: one expert perturbed on one
rank, and — where the encoder is replicated (TP, DP) — the encoder's patch projection perturbed
on one rank; either must break the match."""

import pytest

from megamoe.testing.parity import check_layout, perturb_encoder, reference, vlm_parity_task

CASES = [
    ("ep2", (2, ["parallel.expert=2"], 2), True),
    ("tp2_sp", (2, ["parallel.tensor=2"], 1), perturb_encoder),
    ("pp2", (2, ["parallel.pipeline=2"], 1), True),
    ("dp2", (2, [], 2), perturb_encoder),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,layout,perturb", CASES, ids=[c[0] for c in CASES])
def test_vlm_matches_single_process(name, layout, perturb):
    ref = reference([], dp=layout[2], task=vlm_parity_task)
    assert any(k.startswith("vision.") for k in ref.grads), sorted(ref.grads)[:5]
    assert any(k.startswith("connector.") for k in ref.grads)
    assert ref.losses[0] > 0 and ref.losses[-1] < ref.losses[0] * 1.5
    check_layout([], layout, ref, task=vlm_parity_task, perturb=perturb)
