"""vlm checkpoints reshard, the encoder's own grid included: trained and saved under one layout
(encoder TP 1 and DP 2 under an LM with TP 2; or EP2), loaded under another, the next steps
match the single-process run that never stopped (model, Adam state, schedule, progress).
Without the optimizer state the check fails. (Before the encoder's replicas got distinct
replica ids, a save under its own grid was refused by Megatron's sharding validation.)

With MoE FFNs in the encoder: its experts split over EP 2 at the save, replicated on the
encoder's own grid at the load, and every router buffer (the loss-free biases of the encoder's
and the LM's layer 2, stored apart) matches the straight run as well."""

import pytest

from megamoe.testing.checkpointing import (check_continued, load_and_continue, straight,
                                           train_and_save)
from megamoe.testing.parity import TINY_VLM
from megamoe.testing.pool import run_distributed

K, MORE, LR = 2, 2, 0.01
MODEL = [*TINY_VLM, "train.optimizer=adamw", f"train.lr={LR}", f"train.min_lr={LR}"]
VISION_GRID = ["parallel.tensor=2", "parallel.vision_tensor=1"]
PAIRS = [
    ("vision_grid_to_one", (2, VISION_GRID), (1, [])),
    ("ep2_to_vision_grid", (2, ["parallel.expert=2"]), (2, VISION_GRID)),
]
_STRAIGHT = {}


def reference():
    if "ref" not in _STRAIGHT:
        _STRAIGHT["ref"] = run_distributed(straight, 1, list(MODEL), K + MORE)[0]
    return _STRAIGHT["ref"]


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name,save,load", PAIRS, ids=[p[0] for p in PAIRS])
def test_vlm_reshard(name, save, load, tmp_path):
    root = str(tmp_path / "ckpt")
    saved = run_distributed(train_and_save, save[0], [*MODEL, *save[1]], root, K)[0]
    ref = reference()
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(ref[0][:K], saved))
    got = run_distributed(load_and_continue, load[0], [*MODEL, *load[1]], root, K, MORE)[0]
    check_continued(ref, got, K, atol=0.05 * LR * MORE)


@pytest.mark.timeout(600)
def test_vlm_reshard_without_optimizer_state_is_detected(tmp_path):
    root = str(tmp_path / "ckpt")
    run_distributed(train_and_save, 2, [*MODEL, *VISION_GRID], root, K)
    got = run_distributed(load_and_continue, 1, MODEL, root, K, MORE, load_optimizer=False)[0]
    with pytest.raises(AssertionError):
        check_continued(reference(), got, K, atol=0.05 * LR * MORE)


ENCODER_MOE = [*MODEL, "model.vlm.encoder_moe_layer_freq=[0,1]", "parallel.expert_tensor=1",
               "model.moe.loss_free_bias_rate=0.01",
               # the encoder's own grid routes half a micro-batch per rank: no group losses
               "model.moe.aux_loss_coeff=0", "model.moe.z_loss_coeff=0"]


@pytest.mark.timeout(600)
def test_vlm_encoder_experts_and_router_buffers_reshard(tmp_path):
    root = str(tmp_path / "ckpt")
    ref = run_distributed(straight, 1, ENCODER_MOE, K + MORE, router_buffers=True)[0]
    bias = "vision.decoder.layers.1.mlp.router.selection_bias"
    assert bias in ref[1] and "decoder.layers.1.mlp.router.selection_bias" in ref[1]
    assert ref[1][bias].abs().max() > 0.05 * LR * MORE    # moved: a lost one would show
    run_distributed(train_and_save, 2, [*ENCODER_MOE, "parallel.expert=2"], root, K)
    got = run_distributed(load_and_continue, 2, [*ENCODER_MOE, *VISION_GRID], root, K, MORE,
                          router_buffers=True)[0]
    check_continued(ref, got, K, atol=0.05 * LR * MORE)
