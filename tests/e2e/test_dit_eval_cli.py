"""`megamoe eval` on a tiny dit run with a tiny judge run: an untrained judge is refused with
one line naming it and its accuracy (the judge loader, in the pool worker); with an explicit
`--min-judge-accuracy 0` the evaluation runs and its last line is the JSON of every figure
(t-bin losses, judged accuracy, KID/FID, the expert-load PNG), from the command line. Both
runs are step-0 checkpoints written by a warm pool worker (a training start-up costs ~30 s on
busy cores)."""

from __future__ import annotations

import json
import math
import os

import torch

from megamoe.config import load_config
from megamoe.testing.dit import TINY_DIT
from megamoe.testing.pool import run_distributed

JUDGE = ["parallel.world_size=1", "parallel.expert=1", "model.num_layers=2",
         "model.hidden_size=32", "model.num_attention_heads=2", "model.moe.layer_freq=[0,0]",
         "model.vit.patch_size=4", "data.image_size=16", "data.num_classes=6",
         "train.precision=fp32", "train.eval_iters=1", "train.global_batch_size=8",
         "train.micro_batch_size=8", "run.tensorboard=false"]


def write_runs(dit_dir: str, judge_dir: str) -> str:
    """A warm-started tiny DiT-MoE and an untrained tiny vit judge, saved as step-0 runs;
    returns the error `load_judge` gives for that judge at the default bound."""
    from megamoe.checkpoint.save import save_checkpoint
    from megamoe.commands.dit_judge import load_judge
    from megamoe.config import dump_config
    from megamoe.engines.megatron import build_engine
    from megamoe.testing.dit import warm_start

    for path, cfg in ((dit_dir, load_config(None, [*TINY_DIT, "parallel.world_size=1"])),
                      (judge_dir, load_config("configs/vit_judge.yaml", JUDGE))):
        engine = build_engine(cfg, 6, torch.device("cpu"), with_optimizer=False, ddp=False)
        if cfg.model.family == "dit":
            warm_start(engine, std=0.2)
        cfg.run.dir = path
        os.makedirs(path, exist_ok=True)
        dump_config(cfg, os.path.join(path, "config.yaml"))
        save_checkpoint(os.path.join(path, "checkpoints"), engine, {"vocab_size": 6}, config=cfg)
    try:
        load_judge(judge_dir, load_config(None, TINY_DIT), log=lambda _: None)
    except ValueError as exc:
        return str(exc)
    return "accepted"


def test_dit_eval_refuses_a_weak_judge_then_reports_every_figure(cli, tmp_path):
    dit, judge = str(tmp_path / "dit"), str(tmp_path / "judge")
    refusal = run_distributed(write_runs, 1, dit, judge)[0]
    assert refusal.startswith(f"--judge {judge}: its validation accuracy is "), refusal
    assert "below 0.9" in refusal and "\n" not in refusal, refusal
    small = ["--judge", judge, "--samples", "16", "--steps", "3", "--cfg-scale", "2"]
    out = cli("eval", dit, *small, "--min-judge-accuracy", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["family"] == "dit" and figures["samples"] == 16 and figures["steps"] == 3
    assert len(figures["loss_by_t"]) == 8 and all(v > 0 for v in figures["loss_by_t"])
    assert figures["chance"] == 1 / 6 and 0 <= figures["sample_accuracy"] <= 1
    assert figures["judge_accuracy"] < 0.9 and figures["feature_dims"] == 32
    assert math.isfinite(figures["fid"]) and math.isfinite(figures["kid"])
    assert os.path.isfile(figures["expert_load_png"])
    load = figures["expert_load_by_t"]
    assert load["layers"] == [2, 4] and len(load["t"]) == 3
    assert all(abs(sum(row) - 1) < 1e-3 for step in load["share"] for row in step)
    assert "held-out rectified_flow loss by noise level" in out.stdout
