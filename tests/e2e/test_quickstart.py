"""The language-model quickstart (configs/lm_quickstart.yaml) as a user runs it: 4 gloo ranks (TP2+SP, EP2, DP2) train on the built-in corpus;
TensorBoard events, metrics, summary.json and a checkpoint are written; the loss falls and never
goes below the corpus entropy rate (a lower loss would mean the model sees the future)."""

import glob
import json
import os

import pytest


@pytest.mark.timeout(900)
def test_lm_quickstart_trains_and_writes_its_run_dir(cli, tmp_path):
    run_dir = tmp_path / "run"
    out = cli("train", "--config", "configs/lm_quickstart.yaml", "--set", f"run.dir={run_dir}",
              timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("steps", "first_loss", "last_loss", "val_loss", "tokens_per_s", "wall_s", "layout"):
        assert key in summary
    assert summary["steps"] == 100
    assert summary["layout"].startswith("TP2·PP1·DP2·EP2")
    # model.moe.experts=auto: the CPU table's back end, said at start-up; config.yaml keeps auto
    assert summary["experts"] == "grouped" and "[megamoe] experts: grouped (auto on cpu" in out.stdout
    assert summary["last10_mean_loss"] < 0.85 * summary["first_loss"]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if "loss" in s]
    assert len(losses) == 100
    assert min(losses) > summary["entropy_rate"] - 0.05     # leak check
    assert summary["val_loss"] > summary["entropy_rate"] - 0.05
    assert glob.glob(str(run_dir / "tensorboard" / "events.out.tfevents.*"))
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert os.path.isfile(run_dir / "checkpoints" / latest / "meta.json")
    assert (run_dir / "config.yaml").exists()
    assert "parameters" in out.stdout and "entropy rate" in out.stdout
    # speed as a Megatron user reads it: ms/step, tokens/s over the last steps, tokens consumed
    tokens = 100 * 16 * 64                       # steps × global_batch_size × seq_length
    final = [s for s in steps if "loss" in s][-1]
    assert final["consumed_tokens"] == tokens and final["tokens_per_s_avg"] > 0
    lines = out.stdout.splitlines()
    last = next(ln for ln in lines if ln.startswith("[megamoe] step 100/100 |"))
    assert " ms/step | tok/s " in last and " | 102k tok | elapsed " in last
    assert " | ETA 0:00 | " in last
    # a line while the final checkpoint is saved, then a closing line
    assert f"[megamoe] saving final checkpoint step 100 to {run_dir}/checkpoints" in lines
    closing = next(ln for ln in lines if ln.startswith("[megamoe] finished at step 100 |"))
    assert (f"| final loss {summary['last_loss']:.4f} | validation loss "
            f"{summary['val_loss']:.4f} | wall time ") in closing
