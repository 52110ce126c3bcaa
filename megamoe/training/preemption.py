"""Pre-emption: SIGTERM / SIGUSR1 (Slurm's warning signal) ask every rank to stop.

The handler only sets a flag; once per step all ranks all-reduce it, so they agree on the same
stop step, save a checkpoint and exit cleanly (the requeued job resumes from it).
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    def __init__(self, install: bool = True):
        self.requested = False
        self.signal = None
        if install:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True on every rank as soon as any rank received a stop signal."""
        flag = torch.tensor([1.0 if self.requested else 0.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
