"""The dit family under expert, tensor + sequence, data and pipeline parallelism: the same
per-image loss, step-1 gradients, parameters after 3 steps and router buffers as the
single-process reference that sees every DP rank's images, for
- DiT-MoE (adaLN-Zero blocks, DiT-MoE's top-2 router with a shared expert, rectified flow);
- DiffMoE (papers.md §8b): each expert takes its top-⌊C·N/E⌋ tokens of the rank's micro-batch
  pool (under TP2+SP the pool is the micro-batch gathered over the TP ranks' sequence shards,
  `selection_group("micro-batch")`), the capacity predictor's BCE, and the per-expert EMA
  thresholds τ_e (router buffers, compared after 3 steps) updated once per optimizer step over
  the step's micro-batches of every DP rank;
- DiT-MoE with DDPM's ε-prediction (`model.dit.objective: ddpm`) under DP2 and PP2;
- Race-DiT with its per-layer regularisation (PLR: the router's hidden layer feeds a head that
  predicts the per-token diffusion target, papers.md §7) under EP2 and TP2+SP. The race spans
  the DP group's micro-batch m (Race's default selection group), so its reference runs DP·mbs
  images per micro-batch (tests/distributed/test_family_race.py explains why); besides the
  perturbed expert, a reference with twice the PLR weight must differ in the PLR head's
  gradients (the loss's scale, and under SP its normalisation by the image's whole token
  count, are checked).

The reference sees the same routing pools: `reference(..., dp=DP)` runs each DP rank's
micro-batch as its own micro-batch, in (m, r) order, and averages τ over all of them as the
DP ranks' all-reduce does. The noise, timesteps and label drops are drawn from (seed, step,
sample index), so every layout noises the same image alike; perturbing one expert on one rank
must break the match. Under PP the embedders live on both stages: without their gradient sum
over the pipeline group (an injected bug) the check must fail too; under DP2 DiffMoE's
thresholds without the DP all-reduce (an injected bug) must fail the router-buffer check."""

import pytest

from megamoe.testing.dit import dit_parity_task, perturb_embedder
from megamoe.testing.parity import check_layout, compare, reference
from megamoe.testing.pool import run_distributed

EP2 = (2, ["parallel.expert=2"], 2)
TP2_SP = (2, ["parallel.tensor=2", "parallel.expert_tensor=1"], 1)
DP2 = (2, [], 2)
PP2 = (2, ["parallel.pipeline=2"], 1)
# C = 1 as the paper's training capacity: each expert takes 8 of a micro-batch's 32 tokens
DIFFMOE = ["model.moe.router=diffmoe", "model.moe.topk=1", "model.moe.aux_loss_coeff=0",
           "model.moe.diffmoe.predictor_loss_coeff=0.5"]
DDPM = ["model.dit.objective=ddpm"]

# (name, model overrides, layout, negative control). TP2 with expert-TP 1 and EP 1: each TP
# rank holds a replica of every expert for its own slice of the tokens. DiT-MoE: in a trial the
# perturbed expert of the last rank received none of that rank's 64 tokens at step 1 and the
# later change stayed within the tolerances, so the control is the conditioning path instead:
# the timestep embedder perturbed on the last TP rank, whose tokens it modulates under SP.
# DiffMoE: expert choice gives every expert 8 tokens of the gathered pool; in the trial the
# perturbed expert took tokens of the last rank's shard at step 1 (its gradients differ by
# ~1e-7 against a tolerance of ~1e-8), so the perturbed expert is kept as the control.
CASES = [
    ("dit_moe-ep2", [], EP2, True),
    ("dit_moe-tp2_sp", [], TP2_SP, perturb_embedder),
    ("dit_moe-dp2", [], DP2, True),
    ("dit_moe-pp2", [], PP2, True),
    ("diffmoe-ep2", DIFFMOE, EP2, True),
    ("diffmoe-tp2_sp", DIFFMOE, TP2_SP, True),
    ("diffmoe-dp2", DIFFMOE, DP2, True),
    ("diffmoe-pp2", DIFFMOE, PP2, True),
    ("ddpm-dp2", DDPM, DP2, True),
    ("ddpm-pp2", DDPM, PP2, True),
]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,overrides,layout,perturb", CASES, ids=[c[0] for c in CASES])
def test_dit_matches_single_process(name, overrides, layout, perturb):
    ref = reference(overrides, dp=layout[2], task=dit_parity_task)
    assert any(k.startswith("t_embedder.") and ref.grads[k].abs().max() > 0 for k in ref.grads)
    assert any(".experts." in k for k in ref.grads), sorted(ref.grads)[:8]
    assert ref.losses[0] > 0 and ref.losses[-1] < ref.losses[0] * 1.5
    if overrides is DIFFMOE:     # the thresholds moved in every MoE layer (and are compared)
        taus = [v for k, v in ref.router_state.items() if k.endswith("expert_threshold")]
        assert len(taus) == 2 and all(bool((t > 0).all()) for t in taus), ref.router_state
    if overrides is DDPM:        # DDPM's draws differ from rectified flow's: not the same run
        assert ref.losses[0] != reference([], dp=layout[2], task=dit_parity_task).losses[0]
    check_layout(overrides, layout, ref, task=dit_parity_task, perturb=perturb)


def no_embedder_sync_task(overrides=(), steps: int = 3):
    """`dit_parity_task` with the embedders' pipeline gradient sum removed (undone after)."""
    import megamoe.models.dit.model as M

    saved = M.embedder_grad_sync
    M.embedder_grad_sync = lambda chunks, grids: None
    try:
        return dit_parity_task(overrides, steps)
    finally:
        M.embedder_grad_sync = saved


@pytest.mark.timeout(600)
def test_pp2_without_embedder_sync_is_caught():
    ref = reference([], dp=1, task=dit_parity_task)
    got = run_distributed(no_embedder_sync_task, 2, ["parallel.pipeline=2"])[0]
    problems = compare(ref, got)
    assert any(p.startswith("grad t_embedder.") or p.startswith("grad y_embedder.")
               for p in problems), problems[:5]


def local_thresholds_task(overrides=(), steps: int = 3):
    """`dit_parity_task` with DiffMoE's thresholds updated from this rank's micro-batches only
    (no all-reduce over the DP group; undone after)."""
    from megamoe.moe.routers.diffmoe import DiffMoEPoolRouter

    saved = DiffMoEPoolRouter.after_step

    def local_after_step(router):
        group, router.tp_dp_cp_group = router.tp_dp_cp_group, None
        try:
            saved(router)
        finally:
            router.tp_dp_cp_group = group

    DiffMoEPoolRouter.after_step = local_after_step
    try:
        return dit_parity_task(overrides, steps)
    finally:
        DiffMoEPoolRouter.after_step = saved


@pytest.mark.timeout(600)
def test_diffmoe_dp2_thresholds_without_the_dp_average_are_caught():
    """Only the thresholds differ: the training itself does not read them."""
    ref = reference(DIFFMOE, dp=2, task=dit_parity_task)
    got = run_distributed(local_thresholds_task, 2, DIFFMOE)[0]
    problems = compare(ref, got)
    assert problems and all(p.startswith("router buffer") and "expert_threshold" in p
                            for p in problems), problems[:5]


RACE_PLR = ["model.moe.router=race", "model.moe.aux_loss_coeff=0",
            "model.moe.race.similarity_loss_coeff=0.1", "model.moe.race.plr_coeff=0.5"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,layout", [("ep2", EP2), ("tp2_sp", TP2_SP)], ids=["ep2", "tp2_sp"])
def test_race_plr_matches_single_process(name, layout):
    one_micro_batch = [f"train.micro_batch_size={2 * layout[2]}"]   # the race's DP group
    ref = reference(RACE_PLR + one_micro_batch, task=dit_parity_task)
    plr = [k for k in ref.grads if ".router.plr_" in k]
    assert len(plr) == 4 and all(ref.grads[k].abs().max() > 1e-4 for k in plr), plr
    got = check_layout(RACE_PLR, layout, ref, task=dit_parity_task)
    doubled = reference([*RACE_PLR[:-1], "model.moe.race.plr_coeff=1.0", *one_micro_batch],
                        task=dit_parity_task)
    assert any(p.startswith("grad") and ".router.plr_" in p for p in compare(doubled, got)), \
        "the PLR loss's scale went unnoticed"
