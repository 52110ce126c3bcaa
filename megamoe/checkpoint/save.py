"""Sharded checkpoint save through Megatron's `dist_checkpointing` (torch_dist format).

A checkpoint holds the model, the optimizer (non-distributed optimizer; see DESIGN.md for the
distributed one on CPU), the LR schedule, step, consumed samples and every rank's RNG state.

Atomic: all ranks write into `<root>/.tmp-step_NNNNNNN`; rank 0 then writes `meta.json` (fsync),
renames the folder to `step_NNNNNNN`, and only after that replaces `latest` (temporary file +
`os.replace`). A crash at any moment leaves `latest` naming a complete checkpoint, and the
loader ignores `.tmp-*` folders and folders without `meta.json`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

FORMAT_VERSION = 1
STEP_PREFIX = "step_"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def model_sharded_state_dict(chunks) -> dict:
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def rng_state() -> dict:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def full_sharded_state_dict(engine, *, is_loading: bool = False) -> dict:
    """Everything a resume needs, as one sharded state dict."""
    from megamoe.checkpoint.optimizer_state import sharded_optimizer_state

    sd = model_sharded_state_dict(engine.modules)
    if engine.optimizer is not None:
        sd["optimizer_state"] = sharded_optimizer_state(engine, engine.step, is_loading)
    if engine.scheduler is not None:
        sd["scheduler"] = engine.scheduler.state_dict()
    sd["progress"] = {"step": engine.step, "consumed_samples": engine.consumed_samples}
    sd["rng"] = ShardedObject("rng_state", rng_state(), (_world(),), (_rank(),), replica_id=0)
    return sd


def save_checkpoint(root: str, engine, meta: dict, keep_last: int = 0, config=None,
                    async_queue=None) -> str:
    """Save `engine` at its current step (with the resolved config, so the checkpoint is
    self-contained); returns the final directory.

    With `async_queue` (Megatron's `AsyncCallsQueue`) the tensors are written by a forked
    process while training goes on (the fork is a copy-on-write snapshot of this step's
    tensors; on GPUs Megatron first copies them to host memory); the commit — meta, rename,
    `latest`, pruning — runs when `async_queue.maybe_finalize_async_calls` finds every rank's
    writer done. Until then the checkpoint is only a `.tmp-` directory, so a crash leaves
    `latest` on the previous complete one."""
    step = engine.step
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, ".tmp-" + step_dir_name(step))
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    meta = {"format": FORMAT_VERSION, "step": step,
            "consumed_samples": engine.consumed_samples, "world_size": _world(),
            "layout": engine.dims.describe(), "vocab_size": engine.vocab_size,
            "padded_vocab_size": engine.padded_vocab_size,   # this layout's (models.vocab)
            "optimizer_saved": engine.optimizer is not None,
            **meta}
    commit = functools.partial(_commit, root, tmp, final, meta, config or engine.cfg, keep_last)
    if async_queue is None:
        dist_checkpointing.save(full_sharded_state_dict(engine), tmp)
        _barrier()
        commit()
        return final
    request = dist_checkpointing.save(full_sharded_state_dict(engine), tmp,
                                      async_sharded_save=True)
    request.add_finalize_fn(commit)
    async_queue.schedule_async_request(request)
    return final


def _commit(root: str, tmp: str, final: str, meta: dict, config, keep_last: int) -> None:
    """Rank 0 makes the written directory a complete checkpoint; all ranks wait for it."""
    if _rank() == 0:
        from megamoe.config import dump_config

        dump_config(config, os.path.join(tmp, "config.yaml"))
        _write_durably(os.path.join(tmp, "meta.json"), json.dumps(meta, indent=2))
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_durably(os.path.join(root, "latest"), os.path.basename(final) + "\n")
        if keep_last:
            prune(root, keep_last)
    _barrier()


def _write_durably(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def prune(root: str, keep_last: int) -> list[str]:
    """Delete all but the newest `keep_last` complete checkpoints, and temp folders of steps up
    to the newest complete one (later ones may be asynchronous saves still being written)."""
    from megamoe.checkpoint.load import complete_steps

    removed = []
    steps = complete_steps(root)
    newest = steps[-1] if steps else -1
    for name in os.listdir(root):
        tail = name[len(".tmp-" + STEP_PREFIX):]
        if name.startswith(".tmp-") and (not tail.isdigit() or int(tail) <= newest):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    for step in steps[:-keep_last] if keep_last < len(steps) else []:
        path = os.path.join(root, step_dir_name(step))
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed
