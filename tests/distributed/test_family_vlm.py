"""The vlm family (vit encoder → connector → MoE LM on the generated scenes) under expert,
tensor + sequence, pipeline and data parallelism, and with the encoder on its own grid: the
same answer-token loss, step-1 gradients (encoder, connector and LM), parameters after 3 steps
and grad norms as the single-process reference that sees every DP rank's samples.

Negative controls: one expert perturbed on one rank, or — where the encoder is replicated —
its patch projection perturbed on one rank; with MoE FFNs in the encoder, one of its experts
perturbed on one rank. The asymmetric grids (encoder TP 1 and DP 2 or 4
under an LM with TP 2 and DP 1 or 2) must also catch two injected boundary bugs: (a) the
encoder side's samples permuted relative to the LM's, (b) the encoder's gradient reduced over
the LM's data-parallel group only, as if normalised by the LM's DP instead of its own."""

import pytest

from megamoe.testing.parity import (compare, check_layout, perturb_encoder,
                                    perturb_encoder_expert, reference, vlm_parity_task)
from megamoe.testing.pool import run_distributed

VISION_TP1 = ["parallel.vision_tensor=1"]
NO_ROUTER_LOSSES = ["model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0"]
CONTRASTIVE = ["model.vlm.contrastive_coeff=0.5", *NO_ROUTER_LOSSES]
ENCODER_MOE = ["model.vlm.encoder_moe_layer_freq=[0,1]"]
CASES = [
    ("ep2", [], (2, ["parallel.expert=2"], 2), True),
    ("tp2_sp", [], (2, ["parallel.tensor=2"], 1), perturb_encoder),
    ("pp2", [], (2, ["parallel.pipeline=2"], 1), True),
    # CogVideoX's expert AdaLN (per-modality modulation) in the encoder and the LM, under SP
    ("tp2_sp_expert_adaln", ["model.modality_norm=expert_adaln"],
     (2, ["parallel.tensor=2"], 1), perturb_encoder),
    ("dp2", [], (2, [], 2), perturb_encoder),
    # encoder TP 1 and DP 2, LM TP 2 (+SP) and DP 1
    ("vision_tp1_lm_tp2", VISION_TP1, (2, ["parallel.tensor=2"], 1), perturb_encoder),
    # encoder DP 4, LM DP 2 (LM TP 2, EP 2)
    ("vision_dp4_lm_dp2", VISION_TP1, (4, ["parallel.tensor=2", "parallel.expert=2",
                                           "parallel.expert_tensor=1"], 2), perturb_encoder),
    # the contrastive loss's negatives span the DP ranks (the reference runs the ranks'
    # micro-batches m as one); per-micro-batch router losses off, as they would differ
    ("contrastive_ep2_dp4", CONTRASTIVE, (4, ["parallel.expert=2"], 4), True),
    # MoE FFNs in the encoder, its experts on the LM's expert grid: split over EP 2 (with the
    # loss-free bias, a router buffer per encoder layer); replicated under the encoder's own
    # grid (encoder DP 2 routes half the micro-batch per rank: no per-group router losses);
    # with the encoder on the first of two pipeline stages
    ("encoder_moe_ep2", ENCODER_MOE + ["model.moe.loss_free_bias_rate=0.01"],
     (2, ["parallel.expert=2"], 2), perturb_encoder_expert),
    ("encoder_moe_vision_tp1_lm_tp2", ENCODER_MOE + NO_ROUTER_LOSSES + VISION_TP1,
     (2, ["parallel.tensor=2", "parallel.expert_tensor=1"], 1), perturb_encoder_expert),
    ("encoder_moe_pp2", ENCODER_MOE, (2, ["parallel.pipeline=2"], 1), perturb_encoder_expert),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,overrides,layout,perturb", CASES, ids=[c[0] for c in CASES])
def test_vlm_matches_single_process(name, overrides, layout, perturb):
    model_overrides = [o for o in overrides if not o.startswith("parallel.")]
    ref = reference(model_overrides, dp=layout[2], task=vlm_parity_task)
    assert any(k.startswith("vision.") for k in ref.grads), sorted(ref.grads)[:5]
    if overrides is CONTRASTIVE:
        assert any(k.startswith("contrastive.") for k in ref.grads), sorted(ref.grads)[-5:]
    assert any(k.startswith("connector.") for k in ref.grads)
    if name.startswith("encoder_moe"):
        assert any(k.startswith("vision.") and ".experts." in k for k in ref.grads)
    if "model.moe.loss_free_bias_rate=0.01" in overrides:    # named apart from the LM's
        assert {"layer 2.selection_bias", "encoder layer 2.selection_bias"} <= \
            set(ref.router_state), sorted(ref.router_state)
    assert ref.losses[0] > 0 and ref.losses[-1] < ref.losses[0] * 1.5
    check_layout(overrides, layout, ref, task=vlm_parity_task, perturb=perturb)


def boundary_bug_task(bug: str, overrides=(), steps: int = 3, reference_dp=None,
                      perturb: bool = False):
    """`vlm_parity_task` with one injected boundary bug, undone afterwards (pool workers
    live on): 'permuted' — each encoder DP rank encodes its neighbour's slice of the samples;
    'lm_dp_norm' — the encoder replicas' gradient sum is skipped, so the encoder's gradient
    is reduced over the LM's DP group only."""
    import megamoe.models.vlm.model as M

    saved = M.vision_rows, M.encoder_grad_sync
    if bug == "permuted":
        M.vision_rows = lambda k, dp, F: saved[0]((k + 1) % dp, dp, F)
    else:
        assert bug == "lm_dp_norm", bug
        M.encoder_grad_sync = lambda chunks, grids: None
    try:
        return vlm_parity_task(overrides, steps, reference_dp, perturb)
    finally:
        M.vision_rows, M.encoder_grad_sync = saved


@pytest.mark.timeout(600)
@pytest.mark.parametrize("bug", ["permuted", "lm_dp_norm"])
def test_asymmetric_grid_catches_injected_boundary_bugs(bug):
    world, parallel, dp = next(c[2] for c in CASES if c[0] == "vision_dp4_lm_dp2")
    ref = reference([], dp=dp, task=vlm_parity_task)
    got = run_distributed(boundary_bug_task, world, bug, VISION_TP1 + parallel)[0]
    problems = compare(ref, got)
    assert problems, f"the injected bug '{bug}' went unnoticed"
    if bug == "lm_dp_norm":   # only the encoder's gradients are wrong at step 1
        step1 = [p for p in problems if p.startswith("grad ") and "norm" not in p]
        assert step1 and all(p.startswith("grad vision.") for p in step1), step1


@pytest.mark.timeout(600)
def test_encoder_moe_trains_and_logs_its_layers_apart(tmp_path):
    """A few `megamoe train` steps (the training loop, EP2) with MoE FFNs in the encoder: the
    loss is finite, and the encoder's layer 2 has its own expert-load row, router losses (mean
    and per layer) and routing statistics next to the LM's layer 2 (in metrics.jsonl;
    TensorBoard gets the same)."""
    import math

    from megamoe.testing.parity import TINY_VLM
    from megamoe.testing.recipes import train_recipe

    _, records = run_distributed(train_recipe, 2, None, [
        *TINY_VLM, *ENCODER_MOE, "parallel.world_size=2", "parallel.expert=2",
        "train.steps=2", "train.eval_iters=0", "train.save_interval=0", "train.resume=none",
        "run.tensorboard=true"], str(tmp_path))[0]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records), records
    last = records[-1]
    assert {"2", "encoder_layer2"} <= set(last["expert_load"]), sorted(last["expert_load"])
    assert sum(last["expert_load"]["encoder_layer2"]) > 0
    for name in ("load_balancing_loss", "z_loss"):   # the encoder's mean = its one layer's
        assert math.isfinite(last[name]) and last[f"encoder/{name}"] > 0, sorted(last)
        assert last[f"encoder/layer2/{name}"] == last[f"encoder/{name}"], sorted(last)
        assert f"encoder/layer1/{name}" not in last          # a dense layer
    assert any(k.startswith("router/encoder/") for k in last), sorted(last)
