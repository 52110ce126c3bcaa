"""The run-directory lock (refusal naming the holder, take-over of a stale lock, release) and the
launcher's failure report (the traceback hint only when MEGAMOE_TRACEBACK is unset) and its
wait loop (a rank that fails is named, however its exit falls between the loop's looks)."""

import os
import socket
import sys

import pytest

from megamoe.commands.train import report as _report
from megamoe.launch.lock import RunDirBusy, RunDirLock
from megamoe.launch import spawn
from megamoe.launch.spawn import LaunchResult, RankFailure, spawn_local


def test_a_held_run_dir_is_refused_naming_the_holder(tmp_path):
    held = RunDirLock(str(tmp_path)).acquire()
    with pytest.raises(RunDirBusy, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
        RunDirLock(str(tmp_path)).acquire()
    held.release()
    assert (tmp_path / ".lock").read_text() == ""
    RunDirLock(str(tmp_path)).acquire().release()   # free again, no warning needed


def test_a_stale_lock_from_another_host_is_taken_over_with_a_warning(tmp_path, capsys):
    (tmp_path / ".lock").write_text("pid=4242\nhost=elsewhere\n")
    lock = RunDirLock(str(tmp_path)).acquire()
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and "pid 4242 on host elsewhere" in err, err
    assert "another host" in err, err
    assert (tmp_path / ".lock").read_text() == f"pid={os.getpid()}\nhost={socket.gethostname()}\n"
    lock.release()


@pytest.mark.parametrize("env", [None, "1"])
def test_traceback_hint_only_when_traceback_is_not_shown(monkeypatch, capsys, env):
    if env is None:
        monkeypatch.delenv("MEGAMOE_TRACEBACK", raising=False)
    else:
        monkeypatch.setenv("MEGAMOE_TRACEBACK", env)
    failure = RankFailure(1, "ValueError: bad", "Traceback (most recent call last):\n  boom\n")
    assert _report(LaunchResult(failure=failure), "runs/x") == 2
    err = capsys.readouterr().err
    assert "megamoe: error: rank 1 failed: ValueError: bad" in err
    assert ("MEGAMOE_TRACEBACK=1" in err) == (env is None), err
    assert ("boom" in err) == (env is not None), err


@pytest.mark.timeout(120)
@pytest.mark.parametrize("stale_looks", [0, 1, 2, 3])
def test_a_failed_rank_is_named_whenever_its_exit_is_seen(monkeypatch, stale_looks):
    """The rank exits at once with an error; the launcher's first `stale_looks` looks at the
    exit codes still see it running (as when it exits just after a look). The loop used to look
    twice per pass and stop on the second: a rank that exited between them was reported as done
    (CI saw `train` return 0 on a garbled checkpoint)."""
    real, looks = spawn.LocalRanks.running, []

    def running(self):
        looks.append(1)
        if len(looks) <= stale_looks:
            self.procs[0].join()          # it has exited; this look does not see it
            return [0]
        return real(self)

    monkeypatch.setattr(spawn.LocalRanks, "running", running)
    result = spawn_local(1, sys.exit, (3,))
    assert result.failure is not None, f"a failed rank reported as done ({stale_looks} looks)"
    assert result.failure.rank == 0 and result.failure.message == "SystemExit: 3", result.failure
