"""`megamoe train`: the checks before any rank starts (config, launcher environment, resume
point, run directory and its lock), then training on this process (under a launcher) or on
locally spawned ranks, and the launcher's last word."""

from __future__ import annotations

import os
import sys

from megamoe.commands import error, fast_shutdown


def _train_rank(config) -> None:
    """Entry of one rank (spawned locally or started by a launcher); `config` is a resolved
    config file or the Config itself."""
    from megamoe.training.preemption import StopRequest

    stop = StopRequest()   # first: a stop signal during start-up is kept for the loop
    from megamoe.platform.bridge import quiet_megatron_warnings

    quiet_megatron_warnings()   # before Megatron is imported: it warns at import time
    from megamoe.config import load_config
    from megamoe.launch.env import discover_rank, init_distributed
    from megamoe.training.loop import train

    cfg = load_config(config) if isinstance(config, str) else config
    info = discover_rank()   # checked by cmd_train already
    device = init_distributed(info)
    try:
        train(cfg, device, stop)
    finally:
        fast_shutdown()


def _check_resume(cfg) -> int | None:
    """The step the ranks will resume from (None: a fresh start), checked before they start:
    an explicit `train.resume` without a complete, undamaged checkpoint is an error here."""
    from megamoe.checkpoint.load import check_resume

    choice = cfg.train.resume
    if choice == "none":
        return None
    explicit = choice != "auto"
    return check_resume(choice if explicit else cfg.run.dir, explicit=explicit)


def _make_run_dir(run_dir: str) -> bool:
    """Create `run.dir` (and its parents); True when this call created it."""
    if os.path.isdir(run_dir):
        return False
    os.makedirs(run_dir, exist_ok=True)
    return True


def _remove_unused_run_dir(run_dir: str, created: bool) -> None:
    """After a failure before training wrote anything (no checkpoint, no metrics), remove the
    run directory this command created, so failed starts leave no empty run directories."""
    if not created or not os.path.isdir(run_dir):
        return
    ckpt, metrics = os.path.join(run_dir, "checkpoints"), os.path.join(run_dir, "metrics.jsonl")
    if (os.path.isdir(ckpt) and os.listdir(ckpt)) or (
            os.path.isfile(metrics) and os.path.getsize(metrics)):
        return
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)


def _os_error(exc: OSError, run_dir: str) -> str:
    """'PATH: cannot write the run directory: Read-only file system' for a failed write."""
    return f"{exc.filename or run_dir}: cannot write the run directory: " \
           f"{exc.strerror or exc}"


def cmd_train(args) -> int:
    """`megamoe train --config C [--set K=V …] [--dry-run]`."""
    from megamoe.config import ConfigError, load_config, resolve_run_dir
    from megamoe.launch.env import check_world_size, discover_rank

    try:
        cfg = load_config(args.config, args.overrides)
        from megamoe.models.checks import check_config

        check_config(cfg)        # every check, before any rank starts
        info = discover_rank()   # LaunchError: an inconsistent launcher environment
        if info is not None:
            check_world_size(info, cfg.parallel.world_size)
    except (ConfigError, ValueError) as exc:
        return error(str(exc))
    if cfg.run.dir is None and info is not None:
        # every rank must name the same run dir without talking to the others
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "job")
        cfg.run.dir = os.path.join("runs", f"{cfg.run.name}-{job}")
    cfg.run.dir = resolve_run_dir(cfg)
    if args.dry_run:
        from megamoe.config import config_to_dict
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    try:
        resumed_step = _check_resume(cfg)
    except ValueError as exc:   # CheckpointError
        return error(str(exc))
    if resumed_step is not None and resumed_step >= cfg.train.steps:
        if info is None or info.rank == 0:
            print(f"[megamoe] nothing to do: the run is at step {resumed_step} "
                  f"(train.steps={cfg.train.steps})")
        return 0
    try:
        created = _make_run_dir(cfg.run.dir)
    except OSError as exc:
        return error(_os_error(exc, cfg.run.dir))
    from megamoe.launch.lock import RunDirBusy, RunDirLock

    lock = RunDirLock(cfg.run.dir)
    try:
        if info is None or info.rank == 0:   # the launching process: one per run
            lock.acquire()
        return _run(cfg, info, created)
    except RunDirBusy as exc:
        return error(str(exc))
    finally:
        lock.release()


def _run(cfg, info, created: bool) -> int:
    """Train on this process (under a launcher) or on locally spawned ranks."""
    from megamoe.config import dump_config

    path = os.path.join(cfg.run.dir, "config.yaml")
    try:
        if info is None or info.rank == 0:
            dump_config(cfg, path)
    except OSError as exc:
        _remove_unused_run_dir(cfg.run.dir, created)
        return error(_os_error(exc, cfg.run.dir))
    if info is not None:
        try:
            _train_rank(cfg)
        finally:
            _remove_unused_run_dir(cfg.run.dir, created and info.rank == 0)
        return 0
    from megamoe.launch.spawn import spawn_local

    result = spawn_local(cfg.parallel.world_size, _train_rank, (path,))
    if result.failure is not None or result.interrupted:
        _remove_unused_run_dir(cfg.run.dir, created)
    return report(result, cfg.run.dir)


def report(result, run_dir: str) -> int:
    """The launcher's last word: the rank that failed (the first to die), an interrupted run
    (130), or done."""
    if result.failure is not None:
        f = result.failure
        hint = ""
        if os.environ.get("MEGAMOE_TRACEBACK"):
            print(f.traceback, file=sys.stderr)
        elif f.traceback:
            hint = " (set MEGAMOE_TRACEBACK=1 for the traceback)"
        return error(f"rank {f.rank} failed: {f.message}{hint}")
    if result.interrupted:
        print("megamoe: stopped at once by a second SIGINT, without saving; the newest complete "
              f"checkpoint in {run_dir} is kept", file=sys.stderr)
        return 130
    print(f"[megamoe] {'stopped' if result.stop_signal else 'done'}: {run_dir}")
    return 0
