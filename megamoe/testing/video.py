"""Test helpers for the vlm family on video clips (megamoe.data.clips): the tiny parity config
and a pool task that trains the video recipe briefly and evaluates it like `megamoe eval`."""

from __future__ import annotations

import os

from megamoe.testing.parity import TINY_VLM, parity_task

# TINY_VLM on 4-frame 16x16 clips: tubelets of 2 frames x 4 x 4 pixels -> 2 time slices of
# 4 x 4 tokens (32 encoder tokens: split over TP 2), pixel shuffle 2 -> 8 clip tokens
TINY_VIDEO = [*TINY_VLM, "data.kind=clips", "data.num_frames=4", "model.vit.tubelet_size=2",
              "model.seq_length=20"]


def video_parity_task(overrides=(), steps: int = 3, reference_dp=None, perturb: bool = False):
    """`parity_task` for the vlm family on clips: TINY_VIDEO + `overrides`."""
    return parity_task([*TINY_VIDEO, *overrides], steps, reference_dp, perturb)


def train_and_evaluate(path: str, overrides: list, run_dir: str, iters: int) -> tuple:
    """Pool task (one rank): train the recipe at `path` with `overrides` into `run_dir`, then
    evaluate its final checkpoint as `megamoe eval RUN --iters iters` does. Returns (summary,
    the eval figures)."""
    import torch

    from megamoe.commands.eval import evaluate_checkpoint
    from megamoe.config import load_config
    from megamoe.training.loop import train

    os.makedirs(run_dir, exist_ok=True)
    cfg = load_config(path, [*overrides, f"run.dir={run_dir}", "run.progress=false"])
    summary = train(cfg, torch.device("cpu"))
    figures = evaluate_checkpoint(run_dir, iters=iters, log=lambda *_: None)
    return summary, figures
