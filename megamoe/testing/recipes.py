"""Train a recipe for a few steps on a pool's ranks and read back what the run logged."""

from __future__ import annotations

import json
import os


def train_recipe(path: str, overrides: list, run_dir: str):
    """Pool task: train the config at `path` with `overrides` into `run_dir` (made here, as the
    CLI would). Rank 0 returns (summary, the per-step records of metrics.jsonl); others None."""
    import torch
    import torch.distributed as dist

    from megamoe.config import load_config
    from megamoe.training.loop import train

    os.makedirs(run_dir, exist_ok=True)
    cfg = load_config(path, [*overrides, f"run.dir={run_dir}", "run.progress=false"])
    summary = train(cfg, torch.device("cpu"))
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return summary, [json.loads(line) for line in f if '"loss"' in line]
