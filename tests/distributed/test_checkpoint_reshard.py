"""Save under one layout, load under another (model, Adam state, schedule, progress): the next
steps match the run that never stopped. Without the optimizer state the check fails."""

import pytest

from megamoe.testing.checkpointing import load_and_continue, straight, train_and_save
from megamoe.testing.pool import run_distributed

K = 2          # steps before the checkpoint
MORE = 2       # steps after it
LR = 0.01

# token-choice with the loss-free bias (a router buffer), MoE in every layer
MOR = ["model.num_layers=8", "model.mor.enabled=true", "model.mor.router=token",
       "model.mor.token.balancing=loss_free", "model.mor.token.bias_rate=0.01"]

# (id, (world, overrides) saving, (world, overrides) loading); "model." overrides are the
# reference's too
PAIRS = [
    ("ep2_to_ep1", (2, ["parallel.expert=2"]), (1, [])),
    ("ep2_to_ep4", (2, ["parallel.expert=2"]), (4, ["parallel.expert=4"])),
    ("tp2_to_tp1", (2, ["parallel.tensor=2"]), (1, [])),
    ("pp2_to_pp1", (2, ["parallel.pipeline=2"]), (1, [])),
    ("dp2_to_dp1", (2, []), (1, [])),
    ("dp2_to_dp4", (2, []), (4, [])),
    ("distopt_dp2_to_dp1", (2, ["parallel.distributed_optimizer=true"]), (1, [])),
    ("dp1_to_distopt_dp2_ep2", (1, []), (2, ["parallel.distributed_optimizer=true",
                                            "parallel.expert=2"])),
    ("etp2_to_etp1", (2, ["parallel.tensor=2"]), (2, ["parallel.tensor=2",
                                                      "parallel.expert_tensor=1"])),
    # expert-TP 1 (experts whole, EP2) → expert-TP 2 (each expert split over the TP ranks)
    ("ep2etp1_to_etp2", (4, ["parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=1"]),
     (2, ["parallel.tensor=2"])),
    ("ep2tp2_to_ep4", (4, ["parallel.tensor=2", "parallel.expert=2", "parallel.expert_tensor=1"]),
     (4, ["parallel.expert=4"])),
    # Mixture-of-Recursions: stages [first, block] | [last]; keys independent of the stages
    ("mor_pp2_to_pp1", (2, MOR + ["parallel.pipeline=2"]), (1, MOR)),
    ("mor_pp1_to_pp2", (1, MOR), (2, MOR + ["parallel.pipeline=2"])),
]
_STRAIGHT = {}


def reference(model=()):
    """The uninterrupted single-process run of the model overrides `model`."""
    if tuple(model) not in _STRAIGHT:
        _STRAIGHT[tuple(model)] = run_distributed(straight, 1, list(model), K + MORE)[0]
    return _STRAIGHT[tuple(model)]


def _check(ref, got, atol):
    ref_losses, ref_params = ref
    losses, params = got
    for a, b in zip(ref_losses[K:], losses):
        assert abs(a - b) <= 1e-5 * abs(a), (ref_losses, losses)
    worst = max((ref_params[k] - params[k]).abs().max().item() for k in ref_params)
    assert worst <= atol, f"params differ by {worst:.2e} > {atol:.2e}"
    return worst


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,save,load", PAIRS, ids=[p[0] for p in PAIRS])
def test_reshard(name, save, load, tmp_path):
    root = str(tmp_path / "ckpt")
    saved_losses = run_distributed(train_and_save, save[0], save[1], root, K)[0]
    ref = reference([o for o in save[1] if o.startswith("model.")])
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref[0][:K], saved_losses))
    got = run_distributed(load_and_continue, load[0], load[1], root, K, MORE)[0]
    _check(ref, got, atol=0.05 * LR * MORE)


@pytest.mark.timeout(600)
def test_reshard_without_optimizer_state_is_detected(tmp_path):
    """Negative control: the same comparison fails when Adam's moments are not restored."""
    root = str(tmp_path / "ckpt")
    run_distributed(train_and_save, 2, ["parallel.expert=2"], root, K)
    got = run_distributed(load_and_continue, 1, [], root, K, MORE, load_optimizer=False)[0]
    with pytest.raises(AssertionError):
        _check(reference(), got, atol=0.05 * LR * MORE)
