"""Expert Race under EP2 (world 2 = DP2) and EP2×TP2 with sequence parallelism (world 4, DP2):
the same loss, step-1 gradients, parameters after 3 steps and EMA threshold buffers as the
single-process reference.

Race's selection group is the data-parallel group's micro-batch: micro-batch m of every DP rank
(and every TP rank's sequence shard of it) races for one budget 𝒦 = N·k. The reference mirrors
it with one process whose micro-batch holds micro_batch_size·DP samples: the global batch order
(micro-batch m of DP rank r = samples [m·mbs·dp + r·mbs, …)) puts exactly the DP ranks'
micro-batch m together. The router-similarity loss weight is large here (0.1) so that its
gradient scale is tested: a reference with twice the weight must not match.

Negative controls: a perturbed expert on one rank; the standard per-rank-micro-batch reference
(the race run per DP rank instead of across the group); the similarity weight doubled."""

import pytest

from megamoe.testing.checkpointing import save_then_load
from megamoe.testing.parity import EP2, EP2_TP2, check_layout, compare, reference
from megamoe.testing.pool import run_distributed

DP, MBS = 2, 2                       # TINY's micro_batch_size; both layouts have DP 2
FAMILY = ["model.moe.router=race", "model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0",
          "model.moe.race.similarity_loss_coeff=0.1", "model.moe.allow_non_causal=true"]
LAYOUTS = {"ep2": EP2, "ep2tp2": EP2_TP2}


def race_reference(extra=(), group_micro_batch=True):
    """The single process: one micro-batch per DP group micro-batch (or, for the negative
    control, the standard reference that runs each DP rank's micro-batch on its own)."""
    if group_micro_batch:
        return reference(FAMILY + list(extra) + [f"train.micro_batch_size={MBS * DP}"])
    return reference(FAMILY + list(extra), dp=DP)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_single_process_over_the_dp_group(layout):
    got = check_layout(FAMILY, LAYOUTS[layout], race_reference())
    assert compare(race_reference(group_micro_batch=False), got), \
        "the race did not span DP ranks"
    doubled = race_reference(["model.moe.race.similarity_loss_coeff=0.2"])
    assert any(p.startswith("grad") for p in compare(doubled, got)), \
        "the similarity loss's scale went unnoticed"


@pytest.mark.timeout(300)
def test_ema_threshold_is_model_state_that_moved():
    state = race_reference().router_state
    ema = {k: v for k, v in state.items() if k.endswith("threshold_ema")}
    updates = {k: v for k, v in state.items() if k.endswith("threshold_updates")}
    assert len(ema) == 4 and len(updates) == 4                # every MoE layer
    assert all(v.item() == 3 for v in updates.values())       # once per optimizer step
    assert all(v.abs().item() > 0 for v in ema.values())


@pytest.mark.timeout(300)
def test_ema_threshold_round_trips_through_a_checkpoint(tmp_path):
    layout = LAYOUTS["ep2"][1]
    out = run_distributed(save_then_load, 2, FAMILY + layout, str(tmp_path), FAMILY + layout)[0]
    assert out["differ"] == [], out["differ"]
    assert {k for k in out["keys"] if "threshold" in k} == {
        f"decoder.layers.{i}.mlp.router.{name}" for i in range(4)
        for name in ("threshold_ema", "threshold_updates")}


PLR = ["model.moe.race.plr_coeff=0.5"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_plr_head_matches_single_process(layout):
    """The per-layer regularisation head (next-token prediction from the router's hidden layer)
    under EP2 and EP2×TP2+SP; a reference with twice its weight must differ."""
    got = check_layout(FAMILY + PLR, LAYOUTS[layout], race_reference(PLR))
    assert any(k.endswith("router.plr_target") for k in got.params)
    doubled = race_reference(["model.moe.race.plr_coeff=1.0"])
    assert any("plr" in p for p in compare(doubled, got)), "the PLR loss's scale went unnoticed"
