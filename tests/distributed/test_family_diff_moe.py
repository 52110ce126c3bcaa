"""Diff-MoE (timestep-conditioned gate, expert calibration on the permuted rows) under EP2 and
EP2×TP2 with sequence parallelism: the same loss, step-1 gradients and parameters after 3 steps
as the single-process reference; perturbing one expert on one rank must break it.

adaLN-Zero starts every calibration gate at 0, which would leave the calibration path (and the
experts) without gradient at step 1; the parity runs initialise the calibration's last layer
with a non-zero global value instead (the zero initialisation has its own unit test)."""

import pytest

from megamoe.testing.parity import EP2, EP2_TP2, GRAD_ATOL, check_layout, parity_task, reference

FAMILY = ["model.moe.router=diff_moe", "model.moe.diff_moe.calibration_rank=8",
          "model.moe.shared_expert_ffn_hidden_size=64", "data.synthetic_timesteps=true",
          "model.init_method_std=0.1"]   # expert outputs large enough to train the gates
LAYOUTS = {"ep2": EP2, "ep2tp2": EP2_TP2}


def calibrated_parity_task(*args, **kwargs):
    """`parity_task` with the adaLN-Zero parameters drawn like any weight (std 0.5): still a
    function of the global parameter, so every layout holds the same model."""
    import megamoe.models.init as init

    zero_rule = init._std_for
    init._std_for = lambda key, std, n, shape=(): (0.5 if "adaln_zero" in key
                                                   else zero_rule(key, std, n, shape))
    try:
        return parity_task(*args, **kwargs)
    finally:
        init._std_for = zero_rule


def calibrated_reference():
    return reference(FAMILY, dp=2, task=calibrated_parity_task)


@pytest.mark.timeout(600)
def test_calibration_gets_gradients():
    grads = calibrated_reference().grads
    for name in ("timestep_weight", "calibration.weight_in", "calibration.adaln_zero_weight"):
        g = grads[f"decoder.layers.mlp.router.{name}"]
        assert g.abs().max() > 100 * GRAD_ATOL, name    # well above the parity tolerance


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_single_process(layout):
    check_layout(FAMILY, LAYOUTS[layout], calibrated_reference(), task=calibrated_parity_task)
