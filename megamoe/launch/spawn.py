"""Start the configured ranks on this machine when no launcher did (torchrun, srun, mpirun):
gloo ranks on CPU, one rank per GPU on GPUs."""

from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world_size: int, port: int, target, args, errors) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        target(*args)
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        errors.put((rank, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1)


def spawn_local(world_size: int, target, args: tuple = ()) -> list:
    """Run `target(*args)` on `world_size` local processes; returns [(rank, message, traceback)]
    for the ranks that failed (empty on success)."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_entry, args=(r, world_size, port, target, args, errors))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    failed = []
    while not errors.empty():
        failed.append(errors.get())
    if not failed and any(p.exitcode for p in procs):
        failed = [(r, f"exit code {p.exitcode}", "") for r, p in enumerate(procs) if p.exitcode]
    return sorted(failed)
