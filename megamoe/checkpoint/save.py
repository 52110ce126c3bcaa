"""Sharded checkpoint save through Megatron's `dist_checkpointing` (torch_dist format).

A checkpoint holds the engine-neutral state the engine hands out (megamoe.checkpoint.state:
model, optimizer state by global parameter key, LR schedule, progress, data-loader state and
every rank's RNG state).

Atomic: all ranks write into `<root>/.tmp-step_NNNNNNN`; rank 0 then writes `meta.json` (fsync),
renames the folder to `step_NNNNNNN`, and only after that replaces `latest` (temporary file +
`os.replace`). A crash at any moment leaves `latest` naming a complete checkpoint, and the
loader ignores `.tmp-*` folders and folders without `meta.json`.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shutil

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject

from megamoe.checkpoint.load import (STEP_PREFIX, CheckpointError, all_ranks_ok, reason,
                                     step_dir_name)
from megamoe.moe.routers.soft import SOFT_MOE_GROUPS

FORMAT_VERSION = 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _barrier_after_failure() -> None:
    """A barrier on a failure path: a rank that does not come (it failed elsewhere) costs the
    group's collective timeout, never a second error in place of the first."""
    try:
        _barrier()
    except Exception:  # noqa: BLE001 - the save's own error is the one to report
        pass


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


def rng_sharded() -> ShardedObject:
    """This rank's RNG streams as one sharded object per rank."""
    return ShardedObject("rng_state", rng_state(), (_world(),), (_rank(),), replica_id=0)


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
    _make_tmp(root, tmp)
    meta = {"format": FORMAT_VERSION, "step": step,
            "consumed_samples": engine.consumed_samples, "world_size": _world(),
            "layout": engine.dims.describe(), "vocab_size": engine.vocab_size,
            "padded_vocab_size": engine.padded_vocab_size,   # this layout's (models.vocab)
            "optimizer_saved": getattr(engine, "optimizer", None) is not None,
            "soft_moe_groups": SOFT_MOE_GROUPS,     # the rule in force (load refuses older)
            **_data_source_meta(engine.data_state), **meta}
    commit = functools.partial(_commit, root, tmp, final, meta, config or engine.cfg, keep_last)
    if async_queue is None:
        try:
            dist_checkpointing.save(engine.checkpoint_state().sharded(), tmp)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is one
            error = save_error(root, tmp, exc)   # before the space is given back
            # torch's save fails on every rank, but a rank may learn only that another failed
            # (a CheckpointException without failures) and reads the cause from the file
            # system's state: rank 0 frees the space only after every rank has read it
            _barrier_after_failure()
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise error from exc
        _barrier()
        commit()
        return final
    request = dist_checkpointing.save(engine.checkpoint_state().sharded(), tmp,
                                      async_sharded_save=True)
    request.add_finalize_fn(commit)
    async_queue.schedule_async_request(request)
    return final


def _data_source_meta(data_state: dict) -> dict:
    """A streaming source's per-DP-rank cursors are in the checkpoint: their DP size, which a
    load needs to know before it asks for them (megamoe.checkpoint.state)."""
    source = data_state.get("source")
    return {"data_source_dp_size": int(source["dp_size"])} if source else {}


def _make_tmp(root: str, tmp: str) -> None:
    """Rank 0 creates the empty directory every rank writes into; all ranks learn whether it
    could (a read-only or full file system fails here, with one error on every rank)."""
    error = None
    if _rank() == 0:
        try:
            os.makedirs(root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as exc:
            error = exc
    if not all_ranks_ok(error is None):
        raise save_error(root, tmp, error)


def _commit(root: str, tmp: str, final: str, meta: dict, config, keep_last: int) -> None:
    """Rank 0 makes the written directory a complete checkpoint (recording every file's size
    in `meta.json`, so a later truncation is detected); all ranks learn whether it could."""
    error = None
    if _rank() == 0:
        from megamoe.config import dump_config

        try:
            dump_config(config, os.path.join(tmp, "config.yaml"))
            files = {n: os.path.getsize(os.path.join(tmp, n)) for n in sorted(os.listdir(tmp))}
            _write_durably(os.path.join(tmp, "meta.json"),
                           json.dumps({**meta, "files": files}, indent=2))
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            _write_durably(os.path.join(root, "latest"), os.path.basename(final) + "\n")
        except OSError as exc:
            error = save_error(root, tmp, exc)
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.exists(os.path.join(root, "latest.tmp")):
                os.remove(os.path.join(root, "latest.tmp"))
        if keep_last and error is None:
            prune(root, keep_last)
    if not all_ranks_ok(error is None):
        raise error or save_error(root, final, None)


def save_error(root: str, path: str, exc: BaseException | None) -> CheckpointError:
    """One line for a failed save: the directory, the cause (the operating system's words when
    there is an OS error under the multi-rank failure) and the checkpoint that stays `latest`."""
    cause = os_cause(exc, path) if exc is not None else "another rank could not write it"
    latest = os.path.join(root, "latest")
    kept = (f"{open(latest).read().strip()} is intact and stays the latest"
            if os.path.isfile(latest) else "no earlier checkpoint exists")
    return CheckpointError(f"{path}: cannot save the checkpoint: {cause}; {kept}")


def os_cause(exc: BaseException, path: str) -> str:
    """The operating system's words for the error under `exc` ("No space left on device",
    "Read-only file system"), looking through causes and every rank's failure of a
    CheckpointException, else the state of the file system holding `path`; else the error's
    own one-line reason."""
    stack = [exc]
    while stack:
        e = stack.pop()
        if isinstance(e, OSError) and e.errno:
            return os.strerror(e.errno)
        stack += [c for c in (e.__cause__, e.__context__) if c is not None]
        stack += [pair[0] for pair in getattr(e, "failures", {}).values()]
    found = re.search(r"\[Errno (\d+)\]", str(exc))
    if found:
        return os.strerror(int(found.group(1)))
    return _file_system_state(path) or reason(exc)


def _file_system_state(path: str) -> str | None:
    """"No space left on device" or "Read-only file system" when the file system holding
    `path` is full or read-only: torch's writer reports a short write without an OS error
    ("unexpected pos")."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        fs = os.statvfs(path)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if fs.f_bavail * fs.f_frsize < 1 << 20:
        return f"{os.strerror(errno.ENOSPC)} ({fs.f_bavail * fs.f_frsize:,} bytes free)"
    return None


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
