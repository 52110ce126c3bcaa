"""Find the newest complete checkpoint and load it into an engine of any layout.

A checkpoint directory is complete when it has `meta.json` (written last by the saver) and
Megatron's `metadata.json`. `latest` names the newest; if it is missing, names an incomplete
folder or a corrupt one, the loader says so and falls back to the newest complete step folder.
"""

from __future__ import annotations

import json
import os
import re

import torch

from megamoe.checkpoint.optimizer_state import copy_loaded
from megamoe.checkpoint.save import STEP_PREFIX, full_sharded_state_dict, step_dir_name

_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")


class CheckpointError(ValueError):
    """A user-facing checkpoint problem; the message names the directory or file."""


def is_complete(step_dir: str) -> bool:
    return (os.path.isfile(os.path.join(step_dir, "meta.json"))
            and os.path.isfile(os.path.join(step_dir, "metadata.json")))


def complete_steps(root: str) -> list[int]:
    steps = []
    for name in os.listdir(root) if os.path.isdir(root) else []:
        m = _STEP_RE.match(name)
        if m and is_complete(os.path.join(root, name)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def read_meta(step_dir: str) -> dict:
    path = os.path.join(step_dir, "meta.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir}: incomplete checkpoint (no meta.json)") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: corrupt ({exc.msg} at line {exc.lineno})") from None


def resolve(path: str, log=print) -> str | None:
    """A step directory from a run directory, a checkpoint root or a step directory; None when
    `path` holds no checkpoint yet. Incomplete ones are reported and skipped."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if os.path.isfile(os.path.join(path, "meta.json")) or _STEP_RE.match(os.path.basename(
            os.path.normpath(path))):
        if not is_complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint (meta.json or metadata.json "
                                  "missing: the save did not finish)")
        return path
    root = os.path.join(path, "checkpoints") if os.path.isdir(
        os.path.join(path, "checkpoints")) else path
    latest_file = os.path.join(root, "latest")
    if os.path.isfile(latest_file):
        name = open(latest_file).read().strip()
        candidate = os.path.join(root, name)
        if _STEP_RE.match(name) and is_complete(candidate):
            return candidate
        log(f"[megamoe] {latest_file} names '{name}', which is not a complete checkpoint; "
            "using the newest complete one")
    steps = complete_steps(root)
    if not steps:
        return None
    return os.path.join(root, step_dir_name(steps[-1]))


def load_checkpoint(engine, step_dir: str, *, load_optimizer: bool = True) -> dict:
    """Load model (+ optimizer, schedule, progress, RNG) saved under any layout into `engine`."""
    from megatron.core import dist_checkpointing

    meta = read_meta(step_dir)
    _check_vocab(meta, engine, step_dir)
    engine.step = int(meta["step"])      # the optimizer state is built for the saved step
    sd = full_sharded_state_dict(engine, is_loading=True)
    same_world = meta.get("world_size") == (torch.distributed.get_world_size()
                                            if torch.distributed.is_initialized() else 1)
    if not same_world:
        sd.pop("rng")          # per-rank RNG streams only carry over to the same world size
    if not (load_optimizer and meta.get("optimizer_saved")):
        sd.pop("optimizer_state", None)
    targets = sd.get("optimizer_state", {})
    try:
        state = dist_checkpointing.load(sd, step_dir)
    except CheckpointError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        raise CheckpointError(f"{step_dir}: cannot load: {_reason(exc)}") from exc
    chunks = engine.modules
    if len(chunks) == 1:
        chunks[0].load_state_dict(state["model"], strict=True)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(state[f"model{i}"], strict=True)
    if engine.optimizer is not None:
        # the optimizer's fp32 master copies (bf16 training) follow the loaded weights, then
        # the saved master weights and Adam moments (if any) overwrite them
        reload = getattr(engine.optimizer, "reload_model_params", None)
        if reload is not None:
            reload()
        if targets:
            copy_loaded(targets, state["optimizer_state"], engine)
    if engine.scheduler is not None and "scheduler" in state:
        engine.scheduler.load_state_dict(state["scheduler"])
    engine.step = int(state["progress"]["step"])
    engine.consumed_samples = int(state["progress"]["consumed_samples"])
    if "rng" in state:
        _set_rng(state["rng"])
    return meta


def _check_vocab(meta: dict, engine, step_dir: str) -> None:
    """The checkpoint's vocabulary is the engine's. Only the padding may differ (it follows TP,
    megamoe.models.vocab); Megatron would load other sizes too, silently, as padding rows."""
    saved = int(meta.get("vocab_size", engine.vocab_size))
    if saved != engine.vocab_size:
        raise CheckpointError(f"{step_dir}: saved with a {saved}-token vocabulary, this run's "
                              f"is {engine.vocab_size} (data.tokenizer or model.vocab_size)")


def _reason(exc: BaseException) -> str:
    """The underlying error of a (possibly multi-rank) checkpoint failure, in one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if _ERROR_LINE.match(ln) and "CheckpointException ranks" not in ln]
    text = errors[-1] if errors else f"{type(exc).__name__}: {lines[0] if lines else ''}"
    if text.split(":")[0].endswith(("EOFError", "UnpicklingError")):
        text += " (a checkpoint file is truncated or corrupt)"
    name, sep, rest = text.partition(":")
    return (name.rsplit(".", 1)[-1] + sep + rest)[:400]


_ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception)(:|$)")


def _set_rng(rng: dict) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(rng["torch"])
    get_cuda_rng_tracker().set_states(rng["tracker"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
