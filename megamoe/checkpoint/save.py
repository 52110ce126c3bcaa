"""Sharded checkpoint save through Megatron's `dist_checkpointing` (torch_dist format).

Atomic: every rank writes into `<root>/.tmp-step_NNNNNNN`; rank 0 then writes `meta.json`,
renames the folder to `step_NNNNNNN` and only after that rewrites `latest` (via a temporary file
and `os.replace`), so `latest` never names an incomplete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil

import torch.distributed as dist

from megatron.core import dist_checkpointing


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def model_sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_checkpoint(root: str, chunks, step: int, meta: dict) -> str:
    """Save the model state of every rank for `step`; returns the final directory."""
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, ".tmp-" + step_dir_name(step))
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if dist.is_initialized():
        dist.barrier()
    dist_checkpointing.save(model_sharded_state_dict(chunks), tmp)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump({"step": step, **meta}, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker = os.path.join(root, "latest")
        with open(marker + ".tmp", "w") as f:
            f.write(step_dir_name(step) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker + ".tmp", marker)
    if dist.is_initialized():
        dist.barrier()
    return final
