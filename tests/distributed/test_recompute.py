"""Activation recompute gives the loss and gradients of the same model without it (DESIGN.md
tolerances), for families that read the micro-batch's context: V-MoE with noise on (noise from
each sample's global index), Diff-MoE (timestep-conditioned gate and calibration) and an MoR
model whose shared pool routes by modality on the compacted context.

The recomputed runs use two pipeline stages (4 micro-batches per step): under 1F1B the first
stage runs micro-batch m+1's forward before m's backward, so a recompute that read whatever
context was set last (the old routing-context slot) would route micro-batch m with m+1's
context and fail. The reference is one process without recompute. Negative control: one
expert perturbed on one rank."""

import pytest

from megamoe.testing.parity import compare, reference
from megamoe.testing.pool import run_distributed
from test_family_diff_moe import calibrated_parity_task as recompute_task  # adaLN-Zero drawn

FULL = ["model.recompute_granularity=full", "model.recompute_method=uniform",
        "model.recompute_num_layers=1"]
SELECTIVE_MOE = ["model.recompute_granularity=selective", "model.recompute_modules=[moe]"]
PP2 = ["parallel.pipeline=2"]

VMOE = ["model.moe.router=vmoe", "model.moe.z_loss_coeff=0", "model.moe.allow_non_causal=true",
        "model.moe.vmoe.capacity_ratio=0.75", "model.moe.vmoe.priority=max",
        "model.moe.vmoe.noise_std=1.0",
        "model.moe.vmoe.importance_loss_coeff=0.5", "model.moe.vmoe.load_loss_coeff=0.5"]
DIFF_MOE = ["model.moe.router=diff_moe", "model.moe.diff_moe.calibration_rank=8",
            "data.synthetic_timesteps=true", "model.init_method_std=0.1"]
MOR_MODALITY = ["model.num_layers=8", "model.mor.enabled=true", "model.mor.num_recursions=3",
                "model.mor.router=token", "model.moe.router=modality", "model.moe.z_loss_coeff=0",
                "data.synthetic_modalities=2", "model.moe.modality.mode=pools",
                "model.moe.modality.pool_sizes=[2,2]"]
STEPS = 2

CASES = [("vmoe_full", VMOE, FULL), ("vmoe_selective_moe", VMOE, SELECTIVE_MOE),
         ("diff_moe_full", DIFF_MOE, FULL), ("diff_moe_selective_moe", DIFF_MOE, SELECTIVE_MOE),
         ("mor_modality_full", MOR_MODALITY, FULL),
         ("mor_modality_selective_moe", MOR_MODALITY, SELECTIVE_MOE)]


def _runs(model, recompute, perturb=False):
    ref = reference(list(model), task=_reference_task)
    got = run_distributed(recompute_task, 2, list(model) + recompute + PP2, steps=STEPS,
                          perturb=perturb)[0]
    return ref, got


def _reference_task(*args, **kwargs):
    return recompute_task(*args, steps=STEPS, **kwargs)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,model,recompute", CASES, ids=[c[0] for c in CASES])
def test_recompute_matches_no_recompute(name, model, recompute):
    ref, got = _runs(model, recompute)
    problems = compare(ref, got)
    assert not problems, "\n".join(problems[:20])
    assert len(got.losses) == STEPS and got.grads


@pytest.mark.timeout(600)
def test_negative_control():
    ref, bad = _runs(VMOE, FULL, perturb=True)
    assert compare(ref, bad), "the perturbed model went unnoticed"
