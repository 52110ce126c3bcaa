"""The run-directory lock (refusal naming the holder, take-over of a stale lock, release) and the
launcher's failure report (the traceback hint only when MEGAMOE_TRACEBACK is unset)."""

import os
import socket

import pytest

from megamoe.cli import _report
from megamoe.launch.lock import RunDirBusy, RunDirLock
from megamoe.launch.spawn import LaunchResult, RankFailure


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
