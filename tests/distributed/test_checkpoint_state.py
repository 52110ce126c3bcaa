"""Everything the model holds round-trips through save/load; bad checkpoints get one clear error."""

import os

import pytest

from megamoe.checkpoint.load import CheckpointError, resolve
from megamoe.testing.checkpointing import save_then_load
from megamoe.testing.pool import run_distributed

OPTIONS = ["model.qk_layernorm=true", "model.add_qkv_bias=true",
           "model.moe.shared_expert_ffn_hidden_size=32", "model.moe.shared_expert_gate=true",
           "model.moe.loss_free_bias_rate=0.01"]


@pytest.mark.timeout(300)
def test_every_parameter_buffer_and_extra_state_round_trips(tmp_path):
    out = run_distributed(save_then_load, 2, ["parallel.expert=2", *OPTIONS], str(tmp_path),
                          ["parallel.expert=2", *OPTIONS])[0]
    assert out["differ"] == [], out["differ"]
    assert any("shared_experts" in k for k in out["keys"]) and len(out["keys"]) > 10
    assert any(k.endswith("router.selection_bias") for k in out["keys"])   # loss-free bias
    assert (out["step"], out["consumed"]) == (7, 56)


@pytest.mark.timeout(300)
def test_incompatible_model_config_is_one_clear_error(tmp_path):
    msg = run_distributed(save_then_load, 1, [], str(tmp_path), ["model.hidden_size=48"])[0]
    assert isinstance(msg, str) and str(tmp_path) in msg and "cannot load" in msg


@pytest.mark.timeout(300)
@pytest.mark.parametrize("how", ["truncate", "metadata"])
def test_corrupt_checkpoint_is_one_clear_error(tmp_path, how):
    msg = run_distributed(save_then_load, 1, [], str(tmp_path), [], corrupt=how)[0]
    assert isinstance(msg, str) and "step_0000007" in msg, msg


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve(str(tmp_path / "nope"))


def test_latest_naming_an_incomplete_checkpoint_falls_back(tmp_path):
    for step, complete in ((3, True), (4, False)):
        d = tmp_path / f"step_000000{step}"
        d.mkdir()
        (d / "metadata.json").write_text("{}")
        if complete:
            (d / "meta.json").write_text('{"step": 3}')
    (tmp_path / "latest").write_text("step_0000004\n")
    (tmp_path / ".tmp-step_0000005").mkdir()
    said = []
    assert resolve(str(tmp_path), log=said.append) == os.path.join(tmp_path, "step_0000003")
    assert "not a complete checkpoint" in said[0]
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        resolve(str(tmp_path / "step_0000004"))
