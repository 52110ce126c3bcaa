"""README command one's recipe, the multimodal quickstart (configs/quickstart.yaml: the vlm
family on the generated scenes, 2 gloo ranks, EP2 × DP2), shortened to 40 steps: it trains,
reports validation answer accuracy, and `megamoe eval` prints the answer accuracy, the
image-blind chance, the neighbour-image ablation and caption exact match as its last JSON line,
and writes the expert-usage heat map as a PNG and to TensorBoard. (The full recipe's accuracy
is measured by hand: it takes minutes.)"""

import json
import os

import pytest


@pytest.mark.timeout(600)
def test_vlm_quickstart_trains_and_evaluates(cli, tmp_path):
    run_dir = tmp_path / "run"
    out = cli("train", "--config", "configs/quickstart.yaml", "--set", f"run.dir={run_dir}",
              "--set", "train.steps=40", "--set", "train.eval_interval=20",
              "--set", "train.eval_iters=2", "--set", "run.progress=false", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["layout"].startswith("TP1·PP1·DP2·EP2"), summary["layout"]
    assert summary["last10_mean_loss"] < 0.7 * summary["first_loss"], summary
    assert 0.0 <= summary["val_accuracy"] <= 1.0
    assert "images" in out.stdout and "16 image tokens" in out.stdout
    assert "validation accuracy" in out.stdout

    out = cli("eval", str(run_dir), "--iters", "2", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    for key in ("accuracy", "chance", "shuffled_accuracy", "caption_match", "caption_chance"):
        assert 0.0 <= figures[key] <= 1.0, (key, figures)
    assert figures["questions"] + figures["captions"] == 2 * 32
    assert 0.15 < figures["chance"] < 0.5      # answers balanced: blind guessing stays low
    png = figures["expert_usage_png"]
    assert png.startswith(str(run_dir)) and os.path.getsize(png) > 1000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "eval/expert_usage" in events.Tags()["images"]
