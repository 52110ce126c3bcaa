"""The training loop on data.kind energon under DP2 (EP2 × DP2 on 2 gloo ranks), with packing
(Energon's packing buffer planning rows greedily): a shard with a truncated image trains on,
with the bad sample counted in metrics.jsonl (summed over ranks); a run stopped at step 2 and
resumed from its checkpoint takes the same steps 3 and 4 as the run that never stopped (same
losses: the same samples on every rank, restored per DP rank), and carries its bad-sample count
over."""

import pytest

from megamoe.testing.energon_tasks import build_dataset, damaged_copy
from megamoe.testing.parity import TINY_VLM
from megamoe.testing.pool import run_distributed
from megamoe.testing.recipes import train_recipe


def _args(path, steps):
    return [*TINY_VLM, "data.kind=energon", f"data.path={path}", "model.seq_length=64",
            "data.packing=true", "data.pack_samples=2",
            "parallel.world_size=2", "parallel.expert=2", f"train.steps={steps}",
            "train.save_interval=2", "train.eval_interval=0", "train.eval_iters=1"]


@pytest.mark.timeout(600)
def test_training_counts_bad_samples_and_resumes_exactly(tmp_path):
    base = run_distributed(build_dataset, 2, str(tmp_path / "data"), 32)[0]
    path = str(tmp_path / "damaged")
    damaged_copy(base, path, ["truncated_image"], first_shard=0)
    _, straight = run_distributed(train_recipe, 2, None, _args(path, 4), str(tmp_path / "a"))[0]
    run_distributed(train_recipe, 2, None, _args(path, 2), str(tmp_path / "b"))
    _, resumed = run_distributed(train_recipe, 2, None, _args(path, 4), str(tmp_path / "b"))[0]
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["bad_samples"] == a["bad_samples"], (a["step"], a, b)
    # 24 train samples, 32 read: the truncated one is met at least once, and only counted
    assert straight[-1]["bad_samples"] >= 1
    assert straight[2]["loss"] != straight[0]["loss"]


@pytest.mark.timeout(600)
def test_eval_of_a_run_on_shards(tmp_path):
    """`megamoe eval` on an Energon run: accuracy, the leave-one-out blind chance and the
    neighbour-image control come from the val split's batches (no generator behind them)."""
    from megamoe.commands.eval import evaluate_checkpoint

    path = run_distributed(build_dataset, 2, str(tmp_path / "data"), 32)[0]
    run_distributed(train_recipe, 2, None, _args(path, 2), str(tmp_path / "run"))
    lines = []
    figures = evaluate_checkpoint(str(tmp_path / "run"), iters=1, log=lines.append)
    assert figures["questions"] + figures["captions"] > 0, figures
    for key in ("accuracy", "chance", "shuffled_accuracy"):
        assert 0.0 <= figures[key] <= 1.0, (key, figures)
    if figures["captions"]:
        assert 0.0 <= figures["caption_chance"] <= 1.0, figures
    else:   # no captions evaluated: no caption figures, rather than a 0 that reads as one
        assert figures["caption_match"] is None and figures["caption_chance"] is None
    assert figures["chance_rule"].startswith("leave-one-out")
    assert "neighbour's image" in lines[-2], lines[-2:]
