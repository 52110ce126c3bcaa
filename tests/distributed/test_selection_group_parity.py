"""Every selection group kind under EP2 (DP2) and EP2×TP2 with sequence parallelism (DP2): the
same loss, step-1 gradients, parameters after 3 steps (and EMA thresholds) as the
single-process reference that holds the same groups. The micro-batch kind of expert choice is
tests/distributed/test_family_expert_choice.py, race's data-parallel kind test_family_race.py.

- expert choice per `sequence`: under SP each sample's positions are split over the TP ranks,
  and every (sample, expert) threshold is found over the whole sample (`kth_largest` with B·E
  columns); the reference runs each DP rank's micro-batch on its own.
- expert choice over `data-parallel`: micro-batch m of both DP ranks (and their TP shards)
  form one group; the reference holds them in one micro-batch of micro_batch_size·DP samples.
- race per `micro-batch`: each DP rank's micro-batch races alone; τ̄ (hence τ_ema) is the
  mean over both DP ranks' micro-batches, as the reference's over all of them.

One pool task per layout runs every variant and, as the negative control, the first one with
one expert perturbed on one rank. A second control per variant: the reference of the default
group must not match (the option changed the routing)."""

import pytest
import torch.distributed as dist

from megamoe.testing.parity import EP2, EP2_TP2, compare, parity_task, reference
from megamoe.testing.pool import run_distributed

DP, MBS = 2, 2                      # TINY's micro_batch_size; both layouts have DP 2
LAYOUTS = {"ep2": EP2, "ep2tp2": EP2_TP2}
EC = ["model.moe.router=expert_choice", "model.moe.aux_loss_coeff=0",
      "model.moe.z_loss_coeff=0", "model.moe.allow_non_causal=true"]
RACE = ["model.moe.router=race", "model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0",
        "model.moe.race.similarity_loss_coeff=0.1", "model.moe.allow_non_causal=true"]
GROUP_MICRO_BATCH = [f"train.micro_batch_size={MBS * DP}"]   # the DP ranks' micro-batch m

# name: (overrides, reference (overrides, dp), default group's reference (overrides, dp))
VARIANTS = {
    "ec_sequence": (EC + ["model.moe.expert_choice.selection_group=sequence"],
                    (EC + ["model.moe.expert_choice.selection_group=sequence"], DP),
                    (EC, DP)),
    "ec_data_parallel": (EC + ["model.moe.expert_choice.selection_group=data-parallel"],
                         (EC + ["model.moe.expert_choice.selection_group=data-parallel"]
                          + GROUP_MICRO_BATCH, None),
                         (EC, DP)),
    "race_micro_batch": (RACE + ["model.moe.race.selection_group=micro-batch"],
                         (RACE + ["model.moe.race.selection_group=micro-batch"], DP),
                         (RACE + GROUP_MICRO_BATCH, None)),
}


def variants_task(layout_overrides, names):
    """Every variant under this layout, then the first one with one expert perturbed."""
    out = {name: parity_task(VARIANTS[name][0] + layout_overrides) for name in names}
    out["perturbed"] = parity_task(VARIANTS[names[0]][0] + layout_overrides, perturb=True)
    return out if dist.get_rank() == 0 else None


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_group_kind_matches_single_process(layout):
    world, parallel = LAYOUTS[layout][:2]
    names = list(VARIANTS)
    got = run_distributed(variants_task, world, list(parallel), names)[0]
    for name in names:
        _, (ref_overrides, ref_dp), (default_overrides, default_dp) = VARIANTS[name]
        problems = compare(reference(ref_overrides, dp=ref_dp), got[name])
        assert not problems, f"{name}:\n" + "\n".join(problems[:20])
        assert compare(reference(default_overrides, dp=default_dp), got[name]), \
            f"{name} routed like the default group"
    assert compare(reference(*VARIANTS[names[0]][1]), got["perturbed"]), \
        "the perturbed model went unnoticed"
