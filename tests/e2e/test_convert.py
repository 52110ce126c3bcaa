"""Hand-off: a checkpoint trained under EP2 exports with `megamoe convert --to hf`; transformers
loads it and gives megamoe's logits; `--from hf` brings it back and training resumes under
TP2·EP2 from it."""

import json

import pytest

from megamoe.testing.checkpointing import checkpoint_logits
from megamoe.testing.hf import hf_logits_BSV, load_hf, sample_tokens_BS
from megamoe.testing.pool import run_distributed

TRAIN = ["--config", "configs/lm_quickstart.yaml", "--set", "train.steps=3",
         "--set", "train.warmup_steps=1", "--set", "train.eval_interval=0",
         "--set", "train.eval_iters=1", "--set", "run.tensorboard=false"]


@pytest.mark.timeout(900)
def test_export_loads_in_transformers_and_imports_back(cli, tmp_path):
    pytest.importorskip("transformers")
    run = tmp_path / "run"
    out = cli("train", *TRAIN, "--set", "parallel.world_size=2", "--set", "parallel.tensor=1",
              "--set", "parallel.expert=2", "--set", f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    hf = tmp_path / "hf"
    out = cli("convert", "--to", "hf", str(run), str(hf), "--max-shard-size", "300000")
    assert out.returncode == 0, out.stderr[-2000:]
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2

    tokens = sample_tokens_BS(64, S=32)
    step_dir = str(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip())
    ours = run_distributed(checkpoint_logits, 1, step_dir, tokens)[0]
    model, _ = load_hf(str(hf))
    theirs = hf_logits_BSV(model, tokens)
    assert (ours - theirs).abs().max().item() < 1e-4

    imported = tmp_path / "imported"
    out = cli("convert", "--from", "hf", str(hf), str(imported))
    assert out.returncode == 0, out.stderr[-2000:]
    step0 = imported / "checkpoints" / "step_0000000"
    again = run_distributed(checkpoint_logits, 1, str(step0), tokens)[0]
    assert (again - ours).abs().max().item() < 1e-5

    run2 = tmp_path / "run2"
    out = cli("train", *TRAIN, "--set", f"train.resume={step0}", "--set", f"run.dir={run2}")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((run2 / "summary.json").read_text())
    assert summary["resumed_from_step"] == 0 and summary["layout"].startswith("TP2·PP1·DP2·EP2")


def test_convert_missing_source_is_one_clear_error(cli, tmp_path):
    out = cli("convert", "--to", "hf", str(tmp_path / "none"), str(tmp_path / "out"))
    assert out.returncode == 2 and "no such checkpoint directory" in out.stderr
    assert "Traceback" not in out.stderr
