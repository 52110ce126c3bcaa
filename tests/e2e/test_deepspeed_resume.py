"""`train.engine=deepspeed` from the CLI: the shared Megatron run (EP2, 4 steps) resumed under
DeepSpeed's ZeRO-2 continues exactly as a resume under Megatron does (same losses, step for
step), and DeepSpeed's own checkpoint is saved where the Megatron one would be."""

import json
import shutil

import os

import pytest

# CI installs deepspeed (scripts/test.sh): there a missing package fails, it is not skipped
_ds = (__import__("deepspeed") if os.environ.get("CI")
       else pytest.importorskip("deepspeed"))


def _continue(cli, trained_run, dst, engine: str) -> list:
    run = dst / engine
    shutil.copytree(trained_run, run)
    out = cli("train", "--config", "configs/lm_quickstart.yaml", "--set", "parallel.world_size=2",
              "--set", "parallel.tensor=1", "--set", "parallel.expert=2",
              "--set", "train.warmup_steps=1", "--set", "train.eval_interval=0",
              "--set", "train.eval_iters=1", "--set", "run.tensorboard=false",
              "--set", "train.steps=6", "--set", f"train.engine={engine}",
              "--set", "train.zero_stage=2", "--set", f"run.dir={run}", timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 4 and summary["steps"] == 6
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000006"
    if engine == "deepspeed":
        assert "under DeepSpeed ZeRO-2" in out.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and r["step"] > 4]


@pytest.mark.timeout(900)
def test_megatron_run_resumes_under_deepspeed_as_under_megatron(cli, trained_run, tmp_path):
    megatron = _continue(cli, trained_run, tmp_path, "megatron")
    deepspeed = _continue(cli, trained_run, tmp_path, "deepspeed")
    assert len(megatron) == len(deepspeed) == 2
    for a, b in zip(megatron, deepspeed):
        assert abs(a - b) <= 1e-5 * abs(a), (megatron, deepspeed)
