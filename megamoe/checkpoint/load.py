"""Find the newest loadable checkpoint and load it into an engine of any layout.

A checkpoint directory is complete when it has `meta.json` (written last by the saver) and
Megatron's `metadata.json`; it is whole when its files have the sizes `meta.json` recorded and
every tensor the storage index (`.metadata`) lists lies inside its file. `latest` names the
newest; if it is missing or names an incomplete folder, the loader says so and takes the newest
complete step folder. A resume from a run directory or checkpoint root that cannot load its
newest checkpoint (damaged files, a failed read on any rank) warns naming it and loads the
previous complete one; an explicit step directory must load.

The directory functions here import neither Megatron nor torch.distributed, so the CLI can
check a resume source before it starts any rank.
"""

from __future__ import annotations

import json
import os
import re

STEP_PREFIX = "step_"
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")


class CheckpointError(ValueError):
    """A user-facing checkpoint problem; the message names the directory or file."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:07d}"


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
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt ({_json_reason(exc)})") from None


def _json_reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno}"
    return "not UTF-8 text"


def damage(step_dir: str) -> list[str]:
    """What is wrong with the files of a complete-looking checkpoint (empty when nothing is):
    an unreadable `meta.json` or `metadata.json`, a file whose size differs from the one
    `meta.json` recorded at save time, a tensor the storage index places past its file's end."""
    try:
        meta = read_meta(step_dir)
    except CheckpointError as exc:
        return [str(exc).removeprefix(step_dir + os.sep)]
    problems = []
    for name, size in meta.get("files", {}).items():
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            problems.append(f"{name} is missing")
        elif os.path.getsize(path) != size:
            problems.append(f"{name} has {os.path.getsize(path):,} bytes, {size:,} were saved")
    try:
        with open(os.path.join(step_dir, "metadata.json")) as f:
            json.load(f)
    except (ValueError, OSError) as exc:
        problems.append(f"metadata.json is unreadable ({type(exc).__name__})")
    return problems + _storage_damage(step_dir)


def _storage_damage(step_dir: str) -> list[str]:
    """Files shorter than the byte ranges `.metadata` assigns to their tensors (this also
    catches truncation in checkpoints saved before `meta.json` recorded file sizes)."""
    if not os.path.isfile(os.path.join(step_dir, ".metadata")):
        return []
    from torch.distributed.checkpoint import FileSystemReader

    try:
        index = FileSystemReader(step_dir).read_metadata().storage_data
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged index
        return [f".metadata is unreadable ({type(exc).__name__})"]
    ends: dict[str, int] = {}
    for item in index.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    problems = []
    for name, end in sorted(ends.items()):
        path = os.path.join(step_dir, name)
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size is None:
            problems.append(f"{name} is missing")
        elif size < end:
            problems.append(f"{name} is truncated ({size:,} bytes, its tensors end at {end:,})")
    return problems


def _is_step_dir(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "meta.json"))
            or bool(_STEP_RE.match(os.path.basename(os.path.normpath(path)))))


def _checkpoint_root(path: str) -> str:
    sub = os.path.join(path, "checkpoints")
    return sub if os.path.isdir(sub) else path


def candidates(path: str, log=print) -> list[str]:
    """The complete checkpoints a load from `path` may use, in the order to try them: a step
    directory itself; for a run directory or checkpoint root the one `latest` names, then the
    older complete ones, newest first. Empty when `path` holds no complete checkpoint."""
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if _is_step_dir(path):
        if not is_complete(path):
            raise CheckpointError(f"{path}: incomplete checkpoint (meta.json or metadata.json "
                                  "missing: the save did not finish)")
        return [path]
    root = _checkpoint_root(path)
    steps = complete_steps(root)[::-1]
    latest_file = os.path.join(root, "latest")
    if os.path.isfile(latest_file):
        name = open(latest_file).read().strip()
        m = _STEP_RE.match(name)
        if m and int(m.group(1)) in steps:
            steps = [s for s in steps if s <= int(m.group(1))]   # newer: commit unfinished
        else:
            log(f"[megamoe] {latest_file} names '{name}', which is not a complete checkpoint; "
                "using the newest complete one")
    return [os.path.join(root, step_dir_name(s)) for s in steps]


def resolve(path: str, log=print) -> str | None:
    """A step directory from a run directory, a checkpoint root or a step directory; None when
    `path` holds no checkpoint yet. Incomplete ones are reported and skipped."""
    found = candidates(path, log)
    return found[0] if found else None


def no_checkpoint_error(path: str) -> CheckpointError:
    """The error for an explicit resume source without a complete checkpoint, saying what is
    missing."""
    root = _checkpoint_root(path)
    partial = sorted(n for n in os.listdir(root)
                     if _STEP_RE.match(n) or n.startswith(".tmp-" + STEP_PREFIX))
    if not partial:
        return CheckpointError(f"{path}: no checkpoint to resume from (no {STEP_PREFIX}NNNNNNN "
                               f"folder in {root})")
    return CheckpointError(f"{path}: no complete checkpoint to resume from ({', '.join(partial)} "
                           "lack meta.json or metadata.json: their saves did not finish)")


def _resume_candidates(path: str, explicit: bool, log) -> list[str]:
    """`candidates(path)`; none is an error for an explicit resume source, a fresh start else."""
    found = candidates(path, log)
    if not found and explicit:
        raise no_checkpoint_error(path)
    return found


def check_resume(path: str, *, explicit: bool) -> int | None:
    """Before any rank starts: the step a resume from `path` continues from (its newest
    checkpoint whose files are whole), or None when a fresh start is allowed (`auto` in a run
    directory without checkpoints). Raises CheckpointError when an explicit `path` holds no
    complete checkpoint, or every complete one is damaged."""
    if not explicit and not os.path.isdir(os.path.join(path, "checkpoints")):
        return None
    found = _resume_candidates(path, explicit, log=lambda *_: None)
    if not found:
        return None
    problems = []
    for step_dir in found:
        wrong = damage(step_dir)
        if not wrong:
            return int(read_meta(step_dir)["step"])
        problems.append(f"{step_dir}: corrupt: {'; '.join(wrong)}")
    if len(found) == 1:
        raise CheckpointError(problems[0])
    raise CheckpointError(f"{path}: every checkpoint is damaged: {' | '.join(problems)}")


def load_newest(engine, path: str, *, explicit: bool, log=print) -> str | None:
    """Load the newest checkpoint of `path` that every rank can read into `engine`; returns
    its step directory, or None when `path` holds no complete checkpoint and `explicit` is
    False (a fresh start). A damaged checkpoint is skipped with a warning naming it, unless
    `path` is that step directory itself."""
    found = _resume_candidates(path, explicit, log)
    if not found:
        return None
    problems = []
    for step_dir in found:
        try:
            load_checkpoint(engine, step_dir)
            return step_dir
        except CheckpointError as exc:
            if _is_step_dir(path):
                raise
            problems.append(str(exc))
            log(f"[megamoe] WARNING: {exc}; trying the previous complete checkpoint")
    raise CheckpointError(f"{path}: no checkpoint can be loaded: {' | '.join(problems)}")


def load_checkpoint(engine, step_dir: str, *, load_optimizer: bool = True) -> dict:
    """Load model (+ optimizer, schedule, progress, RNG) saved under any layout into `engine`.
    Collective: the ranks agree that the files are whole and that every rank read them before
    any state is applied, so a failure on one rank fails the load on all of them."""
    from megatron.core import dist_checkpointing

    from megamoe.checkpoint.state import CheckpointState

    wrong = damage(step_dir)
    if not all_ranks_ok(not wrong):
        raise CheckpointError(f"{step_dir}: corrupt: "
                              f"{'; '.join(wrong) or 'damaged files on another rank'}")
    meta = read_meta(step_dir)
    _check_vocab(meta, engine, step_dir)
    _check_soft_moe(meta, engine, step_dir)
    engine.step = int(meta["step"])      # the optimizer state is built for the saved step
    template = engine.checkpoint_state(for_loading=True)
    if meta.get("world_size") != _world_size():
        template.rng = None    # per-rank RNG streams only carry over to the same world size
    template.data = _data_source_template(meta, engine, template.data)
    if not (load_optimizer and meta.get("optimizer_saved")):
        template.optimizer = None
    state, error = None, None
    try:
        state = dist_checkpointing.load(template.sharded(), step_dir)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        error = exc
    if not all_ranks_ok(error is None):
        why = reason(error) if error is not None else "another rank could not read it"
        raise CheckpointError(f"{step_dir}: cannot load: {why}") from error
    engine.load_checkpoint_state(CheckpointState.from_sharded(state), template)
    return meta


def _data_source_template(meta: dict, engine, data: dict) -> dict:
    """The data state to ask for: a streaming source's cursor of this DP rank when the
    checkpoint holds cursors for this run's DP size (else none: the loader then refuses the
    state, saying what changed)."""
    data = {k: v for k, v in data.items() if k != "source"}
    dp_size, grid = meta.get("data_source_dp_size"), getattr(engine, "grid", None)
    if dp_size is not None and grid is not None and dp_size == grid.dp.size():
        data["source"] = {"dp_rank": grid.dp.rank(), "dp_size": dp_size}
    return data


def _check_vocab(meta: dict, engine, step_dir: str) -> None:
    """The checkpoint's vocabulary is the engine's. Only the padding may differ (it follows TP,
    megamoe.models.vocab); Megatron would load other sizes too, silently, as padding rows."""
    saved = int(meta.get("vocab_size", engine.vocab_size))
    if saved != engine.vocab_size:
        raise CheckpointError(f"{step_dir}: saved with a {saved}-token vocabulary, this run's "
                              f"is {engine.vocab_size} (data.tokenizer or model.vocab_size)")


def _check_soft_moe(meta: dict, engine, step_dir: str) -> None:
    """A Soft MoE model saved before its slots became per sequence (no `soft_moe_groups` in
    meta.json) is refused: its parameters load, but they were trained for another rule."""
    from megamoe.moe.routers.soft import SOFT_MOE_CHANGE, SOFT_MOE_GROUPS

    if engine.cfg.model.moe.router == "soft" and meta.get("soft_moe_groups") != SOFT_MOE_GROUPS:
        raise CheckpointError(f"{step_dir}: saved before {SOFT_MOE_CHANGE}")


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_initialized() else 1


def all_ranks_ok(ok: bool) -> bool:
    """True on every rank when `ok` is True on every rank (one all-reduce)."""
    import torch
    import torch.distributed as dist

    from megamoe.launch.env import collective_device

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=collective_device())   # NCCL: CUDA only
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def reason(exc: BaseException) -> str:
    """The underlying error of a (possibly multi-rank) checkpoint failure, in one line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if _ERROR_LINE.match(ln) and "CheckpointException ranks" not in ln]
    text = errors[-1] if errors else f"{type(exc).__name__}: {lines[0] if lines else ''}"
    if text.split(":")[0].endswith(("EOFError", "UnpicklingError")):
        text += " (a checkpoint file is truncated or corrupt)"
    name, sep, rest = text.partition(":")
    return (name.rsplit(".", 1)[-1] + sep + rest)[:400]


_ERROR_LINE = re.compile(r"^[A-Za-z_.]*(Error|Exception)(:|$)")


def set_rng(rng: dict) -> None:
    import torch
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    torch.set_rng_state(rng["torch"])
    get_cuda_rng_tracker().set_states(rng["tracker"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
