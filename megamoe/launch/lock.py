"""One run per run directory: `run.dir/.lock`, an exclusive `flock` held by the launching process
(the local launcher, or rank 0 under torchrun/srun) for the run's life, with its pid and host
written inside so a refused run can name the holder.

The kernel releases the lock when its holder dies, so a lock file that still names a process but
is not locked was left by a process that is gone (killed, or its host's lock lease expired): it
is taken over with a warning. A pid can only be checked on this host; for a file naming another
host the free lock is the evidence (Linux maps flock on NFS to the server's byte-range locks,
so a live holder on another host keeps it locked). A filesystem without locks gets a warning
and no protection. The file is emptied, not removed, on release: removing it would let two runs
lock different files under the same name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys

LOCK_NAME = ".lock"


class RunDirBusy(Exception):
    """Another live run holds the run directory, or its lock file cannot be created."""


def _describe(text: str) -> tuple[str, str]:
    """(pid, host) recorded in a lock file, "?" for what is missing."""
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    return fields.get("pid", "?"), fields.get("host", "?")


def _gone(pid: str, host: str) -> str:
    """Why the recorded holder no longer holds the lock, for the take-over warning."""
    if host != socket.gethostname():
        return "on another host, where its pid cannot be checked; the lock was free"
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return "that process is gone"
    except PermissionError:
        pass
    return "that pid is running but does not hold the lock (a reused pid)"


class RunDirLock:
    """Held from `acquire()` until `release()` or the process ends."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.fd = None

    def acquire(self) -> "RunDirLock":
        """Lock the run directory (which must exist), or raise RunDirBusy naming the holder."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunDirBusy(f"run.dir {os.path.dirname(self.path)}: cannot create the lock "
                             f"file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid, host = _describe(_read(fd))
            os.close(fd)
            raise RunDirBusy(f"run.dir {os.path.dirname(self.path)} is in use by another "
                             f"megamoe run (pid {pid} on host {host}; lock {self.path})") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            print(f"megamoe: warning: {self.path}: this filesystem does not support locks; "
                  f"a second run on this run.dir would not be refused", file=sys.stderr)
        previous = _read(fd)
        if previous.strip():
            pid, host = _describe(previous)
            print(f"megamoe: warning: taking over the stale lock {self.path} of pid {pid} on "
                  f"host {host} ({_gone(pid, host)})", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid={os.getpid()}\nhost={socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        os.close(self.fd)   # closing the last descriptor drops the flock
        self.fd = None


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace")
