"""CogVideoX's expert adaptive norm (megamoe.blocks.norms.ModalityExpertAdaLN) under TP2 with
sequence parallelism: the same loss, step-1 gradients (the norms' included) and parameters
after 3 steps as one process. Negative control: without the `sequence_parallel` mark on the
modulation parameters Megatron does not sum their gradients over TP, and the norms' gradients
differ. A checkpoint of a model with the option saves and loads the modulation under TP2.

The modulation starts at zero (adaLN-Zero); the parity runs draw it like any weight instead, so
each modality's shift and scale act from step 1 (the zero start has its own unit test)."""

import pytest

from megamoe.testing.checkpointing import save_then_load
from megamoe.testing.parity import compare, parity_task, reference
from megamoe.testing.pool import run_distributed

ON = ["model.modality_norm=expert_adaln", "data.synthetic_modalities=2"]
TIMESTEP = [*ON, "data.synthetic_timesteps=true"]
TP2_SP = ["parallel.tensor=2", "parallel.sequence_parallel=true"]


def modulated_parity_task(*args, **kwargs):
    """`parity_task` with the adaLN-Zero parameters drawn with std 0.5: a function of the
    global parameter like every weight, so both layouts hold the same model."""
    import megamoe.models.init as init

    zero_rule = init._std_for
    init._std_for = lambda key, std, n, shape=(): (0.5 if "adaln_zero" in key
                                                   else zero_rule(key, std, n, shape))
    try:
        return parity_task(*args, **kwargs)
    finally:
        init._std_for = zero_rule


def drop_sequence_parallel_mark(engine) -> bool:
    """The bug the mark prevents: the modulation's gradients stay per-rank partial sums."""
    from megamoe.blocks.norms import ModalityExpertAdaLN

    norms = [m for c in engine.modules for m in c.modules()
             if isinstance(m, ModalityExpertAdaLN)]
    for norm in norms:
        for name, p in norm.named_parameters():
            if "adaln_zero" in name:
                p.sequence_parallel = False
    return bool(norms)


@pytest.mark.timeout(600)
def test_tp2_sp_matches_single_process():
    ref = reference(TIMESTEP, dp=1, task=modulated_parity_task)
    got = run_distributed(modulated_parity_task, 2, [*TIMESTEP, *TP2_SP])[0]
    assert not compare(ref, got), "\n".join(compare(ref, got)[:20])
    assert any("adaln_zero" in k for k in got.grads)
    bad = run_distributed(modulated_parity_task, 2, [*TIMESTEP, *TP2_SP],
                          perturb=drop_sequence_parallel_mark)[0]
    broken = compare(ref, bad)
    assert any(p.startswith("grad ") and "adaln_zero" in p for p in broken), broken


@pytest.mark.timeout(600)
def test_checkpoint_round_trip_under_tp2(tmp_path):
    out = run_distributed(save_then_load, 2, [*ON, *TP2_SP], str(tmp_path), [*ON, *TP2_SP])[0]
    assert out["differ"] == [] and out["step"] == 7
    saved = [k for k in out["keys"] if "adaln_zero" in k]
    assert len(saved) == 2 * 2 * 4, out["keys"]    # shift, scale × 2 norms × 4 layers
