"""vit checkpoints reshard like the LM's: trained and saved under one layout, loaded under
another (model, Adam state, schedule, progress, V-MoE's noise step), the next steps match the
single-process run that never stopped. Without the optimizer state the check fails."""

import pytest

from megamoe.testing.checkpointing import (check_continued, load_and_continue, straight,
                                           train_and_save)
from megamoe.testing.parity import TINY_VIT
from megamoe.testing.pool import run_distributed

K, MORE, LR = 2, 2, 0.01
# Adam (TINY_VIT trains with SGD, which has no state to lose)
GAP = [*TINY_VIT, "model.vit.pool=gap", "train.optimizer=adamw", f"train.lr={LR}",
       f"train.min_lr={LR}"]
PAIRS = [
    ("ep2_to_ep1", GAP, (2, ["parallel.expert=2"]), (1, [])),
    ("tp2sp_ep2_to_pp2", GAP, (4, ["parallel.tensor=2", "parallel.expert=2",
                                   "parallel.expert_tensor=1"]), (2, ["parallel.pipeline=2"])),
]
_STRAIGHT = {}


def reference(model):
    if tuple(model) not in _STRAIGHT:
        _STRAIGHT[tuple(model)] = run_distributed(straight, 1, list(model), K + MORE)[0]
    return _STRAIGHT[tuple(model)]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,model,save,load", PAIRS, ids=[p[0] for p in PAIRS])
def test_vit_reshard(name, model, save, load, tmp_path):
    root = str(tmp_path / "ckpt")
    saved = run_distributed(train_and_save, save[0], [*model, *save[1]], root, K)[0]
    ref = reference(model)
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref[0][:K], saved))
    got = run_distributed(load_and_continue, load[0], [*model, *load[1]], root, K, MORE)[0]
    check_continued(ref, got, K, atol=0.05 * LR * MORE)


@pytest.mark.timeout(600)
def test_vit_reshard_without_optimizer_state_is_detected(tmp_path):
    root = str(tmp_path / "ckpt")
    run_distributed(train_and_save, 2, [*GAP, "parallel.expert=2"], root, K)
    got = run_distributed(load_and_continue, 1, GAP, root, K, MORE, load_optimizer=False)[0]
    with pytest.raises(AssertionError):
        check_continued(reference(GAP), got, K, atol=0.05 * LR * MORE)
