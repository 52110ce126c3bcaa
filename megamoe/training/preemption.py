"""Pre-emption: SIGTERM / SIGUSR1 (Slurm's warning signal) / SIGINT (Ctrl-C) ask every rank to
stop.

The handler only sets a flag; once per step all ranks all-reduce it, so they agree on the same
stop step, save a checkpoint and exit cleanly (the requeued job resumes from it). After the first
SIGINT a second one ends the rank at once (the default action: no traceback, no save; the last
complete checkpoint stays `latest`). The local launcher starts ranks with these signals blocked,
so one sent during start-up waits here instead of killing the rank; it is honoured at the first
agreement point.
"""

from __future__ import annotations

import signal

from megamoe.checkpoint.load import all_ranks_ok
from megamoe.launch.spawn import STOP_SIGNALS


class StopRequest:
    def __init__(self, install: bool = True):
        self.requested = False
        self.signal = None
        if install:
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        self.signal = self.signal or signal.Signals(signum).name
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)   # a second Ctrl-C: stop at once

    def agreed(self) -> bool:
        """True on every rank as soon as any rank received a stop signal."""
        return not all_ranks_ok(not self.requested)
