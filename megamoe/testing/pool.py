"""Pooled gloo workers for multi-process tests on CPU.

Importing Megatron costs seconds per process, so each world size keeps one pool of worker
processes alive across tests. A task is a module-level function (picked by module and name) run
on every rank; each returns a picklable value. Any exception or a timeout fails the task with the
rank's traceback and restarts the pool, so a hang costs one timeout, not the whole suite.
"""

from __future__ import annotations

import atexit
import importlib
import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = float(os.environ.get("MEGAMOE_TEST_TIMEOUT", "240"))
COLLECTIVE_TIMEOUT_S = 60.0


class WorkerError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(rank: int, world_size: int, port: int, inbox, outbox) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MEGAMOE_DEVICE"] = "cpu"      # the pool is the CPU test bed, also on GPU hosts
    import torch

    torch.set_num_threads(1)
    from megamoe.launch.env import RankInfo, init_distributed
    from megamoe.platform.bridge import quiet_megatron_warnings

    quiet_megatron_warnings()
    init_distributed(RankInfo(rank, world_size, rank, "test-pool"), "127.0.0.1", port,
                     timeout_s=COLLECTIVE_TIMEOUT_S)
    outbox.put((rank, "ready", None))
    parent = os.getppid()
    while True:
        try:
            task = inbox.get(timeout=5)
        except queue.Empty:
            if os.getppid() != parent:     # the test process died: do not linger
                break
            continue
        if task is None:
            break
        module, name, args, kwargs = task
        try:
            fn = getattr(importlib.import_module(module), name)
            outbox.put((rank, "ok", fn(*args, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
            outbox.put((rank, "error", traceback.format_exc()))
        finally:
            from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

            from megamoe.parallel import destroy_groups

            # process-global: a backward without the schedule (unit tests) creates it with
            # shape [], which the schedule's later copy of a [1] scale refuses
            MoEAuxLossAutoScaler.main_loss_backward_scale = None
            try:
                destroy_groups()
            except Exception:  # noqa: BLE001
                pass


class WorkerPool:
    def __init__(self, world_size: int, start_timeout_s: float = 120.0):
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        port = _free_port()
        self.inboxes = [ctx.Queue() for _ in range(world_size)]
        self.outbox = ctx.Queue()
        self.procs = [
            # not daemonic: Megatron's checkpoint writer starts child processes
            ctx.Process(target=_worker_main, args=(r, world_size, port, self.inboxes[r], self.outbox),
                        daemon=False)
            for r in range(world_size)
        ]
        for p in self.procs:
            p.start()
        self._collect(start_timeout_s, expect="ready")

    def _collect(self, timeout_s: float, expect: str = "ok") -> list:
        results, errors, pending = [None] * self.world_size, [], self.world_size
        deadline = time.monotonic() + timeout_s
        while pending:
            try:
                rank, status, value = self.outbox.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
                if dead or time.monotonic() > deadline:
                    self.close()
                    why = f"rank(s) {dead} died" if dead else f"timed out after {timeout_s:.0f} s"
                    raise WorkerError(f"{self.world_size}-rank task: {why}\n" + "\n".join(errors))
                continue
            pending -= 1
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{value}")
                # the other ranks may wait in a collective until its timeout
                deadline = min(deadline, time.monotonic() + COLLECTIVE_TIMEOUT_S + 15)
            elif status == expect:
                results[rank] = value
        if errors:
            self.close()
            raise WorkerError("\n".join(errors))
        return results

    def run(self, fn, *args, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs) -> list:
        task = (fn.__module__, fn.__name__, args, kwargs)
        for box in self.inboxes:
            box.put(task)
        return self._collect(timeout_s)

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self) -> None:
        for box in self.inboxes:
            try:
                box.put(None)
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()


_POOLS: dict[int, WorkerPool] = {}


def run_distributed(fn, world_size: int, *args, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs):
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; returns the per-rank results."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive():
        pool = _POOLS[world_size] = WorkerPool(world_size)
    try:
        return pool.run(fn, *args, timeout_s=timeout_s, **kwargs)
    except WorkerError:
        _POOLS.pop(world_size, None)
        raise


@atexit.register
def shutdown_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()
