"""Start the configured ranks on this machine when no launcher did (torchrun, srun, mpirun):
gloo ranks on CPU, one rank per GPU on GPUs.

The launcher owns its ranks for their whole life:
- each rank runs in its own process group, with everything it starts (Megatron's
  dist-checkpointing manager, async-save writers), so the launcher can end a rank's whole tree;
  a rank ends its group when the launcher dies (even by SIGKILL);
- SIGTERM, SIGUSR1 and SIGINT sent to the launcher are forwarded to the ranks, which agree on a
  stop, save and exit (megamoe.training.preemption). Ranks do not see the terminal's Ctrl-C
  (their groups are not in the foreground), so one press is one SIGINT; a second press ends the
  ranks at once. Signals are blocked while the ranks start, so none is lost;
- the first rank to die (by signal or a non-zero exit) is named; the others are stopped
  (SIGTERM, a grace period, SIGKILL) and every rank's group is ended before returning.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait

import torch.multiprocessing as mp

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)   # megamoe.training.preemption
GRACE_S = 2.0   # after a rank died, how long the others may take to exit before SIGKILL


@dataclass
class RankFailure:
    rank: int
    message: str      # "ValueError: …", "killed by SIGKILL", "exit code 3"
    traceback: str


@dataclass
class LaunchResult:
    failure: RankFailure | None = None   # the rank that died first
    stop_signal: str | None = None       # the signal the ranks were asked to stop on
    interrupted: bool = False            # a second Ctrl-C ended the ranks without saving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_launcher() -> None:
    """Own process group for this rank and its children; end the group when the launcher dies."""
    os.setpgid(0, 0)
    parent = mp.parent_process()
    if parent is None:
        return

    def watch():
        wait([parent.sentinel])   # readable once the launcher is gone
        os.killpg(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="megamoe-launcher-watch", daemon=True).start()


def _rank_entry(rank: int, world_size: int, port: int, target, args, report) -> None:
    """A spawned rank, in its own process group; the stop signals stay blocked until `target`
    installs its handlers (megamoe.training.preemption.StopRequest unblocks them). An exception
    goes to the launcher through `report`."""
    _die_with_launcher()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        target(*args)
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        report.send((f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1)


def _kill_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _how_it_ended(exitcode: int) -> str:
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


class LocalRanks:
    """The spawned ranks, their error pipes and the signals sent to their process groups."""

    def __init__(self, world_size: int, target, args: tuple):
        ctx = mp.get_context("spawn")
        port = free_port()
        self.procs, self.reports = [], []
        for rank in range(world_size):
            recv, send = ctx.Pipe(duplex=False)
            self.procs.append(ctx.Process(
                target=_rank_entry, args=(rank, world_size, port, target, args, send)))
            self.reports.append((recv, send))

    def start(self) -> None:
        """Start every rank with the stop signals blocked (inherited; a rank unblocks them once
        its handlers are in place)."""
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()   # first: starting it unblocks SIGINT and SIGTERM
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for p in self.procs:
                p.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        for _, send in self.reports:
            send.close()   # the rank holds the only writer: a dead rank reads as EOF

    def forward(self, sig: int) -> None:
        """`sig` to each running rank alone (its helpers, e.g. Megatron's checkpoint manager,
        must live on while it saves)."""
        for r in self.running():
            if self.procs[r].pid is not None:
                _kill_quietly(self.procs[r].pid, sig)

    def send(self, sig: int, ranks=None) -> None:
        """`sig` to the process group of each rank: the rank and everything it started (to the
        rank alone if it has not made its group yet)."""
        for r in range(len(self.procs)) if ranks is None else ranks:
            p = self.procs[r]
            if p.pid is None:
                continue
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                if p.exitcode is None:
                    _kill_quietly(p.pid, sig)

    def running(self) -> list[int]:
        return [r for r, p in enumerate(self.procs) if p.exitcode is None]

    def failure(self, rank: int) -> RankFailure:
        recv, _ = self.reports[rank]
        try:
            if recv.poll():
                message, tb = recv.recv()
                return RankFailure(rank, message, tb)
        except (EOFError, OSError):
            pass
        return RankFailure(rank, _how_it_ended(self.procs[rank].exitcode), "")

    def first_failure(self, ranks: list[int]) -> RankFailure | None:
        """Among ranks seen exiting together, the culprit: a rank killed by a signal before one
        that exited with an error (peers of a dead rank fail in their collectives)."""
        bad = [r for r in ranks if self.procs[r].exitcode]
        if not bad:
            return None
        return self.failure(min(bad, key=lambda r: (self.procs[r].exitcode > 0, r)))

    def stop_all(self, grace_s: float = GRACE_S) -> None:
        """SIGTERM the running ranks, SIGKILL the groups of those left after `grace_s`."""
        self.send(signal.SIGTERM, self.running())
        deadline = time.monotonic() + grace_s
        while self.running() and time.monotonic() < deadline:
            wait([self.procs[r].sentinel for r in self.running()], 0.1)
        self.send(signal.SIGKILL, self.running())
        for p in self.procs:
            p.join()

    def close(self) -> None:
        for recv, _ in self.reports:
            recv.close()


class _SignalInbox:
    """Signals to the launcher, delivered as bytes on a socket the wait loop watches (the
    handlers do nothing else, so no work runs inside a signal handler)."""

    def __init__(self):
        self.r, self.w = socket.socketpair()
        self.r.setblocking(False)
        self.w.setblocking(False)
        self.old_fd = signal.set_wakeup_fd(self.w.fileno(), warn_on_full_buffer=False)
        self.old = {sig: signal.signal(sig, lambda *_: None) for sig in STOP_SIGNALS}

    def take(self) -> list[int]:
        received = b""
        try:
            while chunk := self.r.recv(256):
                received += chunk
        except BlockingIOError:
            pass
        return list(received)

    def close(self) -> None:
        for sig, handler in self.old.items():
            signal.signal(sig, handler)
        signal.set_wakeup_fd(self.old_fd)
        self.r.close()
        self.w.close()


def _announce(sig: int) -> None:
    again = " (Ctrl-C again to stop at once)" if sig == signal.SIGINT else ""
    print(f"[megamoe] {signal.Signals(sig).name} received: the ranks save a checkpoint after "
          f"this step and exit{again}", flush=True)


def spawn_local(world_size: int, target, args: tuple = ()) -> LaunchResult:
    """Run `target(*args)` on `world_size` local processes and wait for them, forwarding stop
    signals (see the module docstring)."""
    ranks, result = LocalRanks(world_size, target, args), LaunchResult()
    inbox, interrupts, exited = _SignalInbox(), 0, set()
    try:
        ranks.start()
        while True:
            # One look at the exit codes per pass, used both to name a failed rank and to end
            # the loop: a rank that exits between two looks is still examined (the loop used to
            # end on a second look, and a rank failing in that gap was reported as done).
            running = ranks.running()
            now = [r for r in range(world_size) if r not in exited and r not in running]
            exited.update(now)
            failure = ranks.first_failure(now)
            if failure is not None and result.failure is None and not result.interrupted:
                result.failure = failure
                ranks.stop_all()
                running = ranks.running()
            if not running:
                break
            # a rank's sentinel can stay open in its forked writers: poll exit codes as well
            ready = wait([inbox.r] + [ranks.procs[r].sentinel for r in running], 1.0)
            for sig in inbox.take() if inbox.r in ready else []:
                interrupts += sig == signal.SIGINT
                if interrupts > 1:
                    result.interrupted = True
                    ranks.send(signal.SIGKILL)
                else:
                    result.stop_signal = result.stop_signal or signal.Signals(sig).name
                    ranks.forward(sig)
                    _announce(sig)
    finally:
        inbox.close()
        ranks.send(signal.SIGKILL)   # leftovers of a rank that was killed or failed
        ranks.close()
    return result
