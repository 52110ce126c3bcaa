"""Signals and crashes with real processes: SIGTERM and Ctrl-C to the local launcher stop every
rank with a checkpoint (a second Ctrl-C at once), a signal during start-up stops cleanly, a rank
killed with SIGKILL is named and no process of the run outlives the launcher (its stdout pipe
reaches EOF, as `megamoe train … | tee log` needs), and a second run on a locked run.dir is
refused."""

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--config", "configs/lm_quickstart.yaml", "--set", "parallel.world_size=2",
        "--set", "parallel.tensor=1", "--set", "parallel.expert=2", "--set", "model.num_layers=2",
        "--set", "model.seq_length=32", "--set", "train.global_batch_size=8",
        "--set", "train.steps=1000", "--set", "train.warmup_steps=2",
        "--set", "train.eval_interval=0", "--set", "train.eval_iters=0",
        "--set", "run.tensorboard=false", "--set", "run.progress=false"]
EVERY_STEP = ("--set", "train.save_interval=1")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
ENV.pop("MEGAMOE_TRACEBACK", None)


class Run:
    """`megamoe train` in its own session (so a signal to its group is what a terminal's Ctrl-C
    does to the foreground job), stdout and stderr read to EOF by threads, as `| tee` would."""

    def __init__(self, run_dir, *extra):
        self.seen = set()   # every process of the run seen so far, ended when the test ends
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "megamoe", "train", *ARGS, "--set", f"run.dir={run_dir}",
             *extra], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, start_new_session=True)
        self.out, self.err = [], []
        self.readers = [threading.Thread(target=lambda f=f, sink=sink: sink.extend(f), daemon=True)
                        for f, sink in ((self.proc.stdout, self.out),
                                        (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while text not in self.stdout:
            self.descendants()
            if self.proc.poll() is not None or time.time() > deadline:
                self.kill()
                pytest.fail(f"never printed {text!r}:\n{self.stdout}\n{self.stderr}")
            time.sleep(0.05)

    def descendants(self) -> list:
        try:
            procs = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.seen.update(procs)
        return procs

    def ranks(self) -> list:
        """The launcher's rank processes, in rank order (started in that order)."""
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            return []
        ranks = [p for p in children if "spawn_main" in " ".join(p.cmdline())]
        return sorted(ranks, key=lambda p: (p.create_time(), p.pid))

    def finish(self, timeout: float) -> int:
        """Exit status; fails unless the launcher exits and both pipes reach EOF in time."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the launcher did not exit within {timeout}s:\n{self.stderr}")
        for t in self.readers:
            t.join(timeout=10)
            assert not t.is_alive(), "a process of the run still holds the output pipe"
        return rc

    def kill(self) -> None:
        """End the launcher and every process of the run seen (orphans included)."""
        self.descendants()
        self.proc.kill()
        for p in self.seen:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.fixture
def start():
    """Start runs that are all killed when the test ends, whatever it left running."""
    runs = []
    yield lambda *args: runs.append(Run(*args)) or runs[-1]
    for run in runs:
        run.kill()


def assert_all_gone(procs) -> None:
    _, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive, [(p.pid, p.cmdline()[-3:]) for p in alive]


def latest(run_dir) -> str:
    ckpt = run_dir / "checkpoints"
    name = (ckpt / "latest").read_text().strip()
    assert (ckpt / name / "meta.json").exists(), name   # a complete checkpoint
    return name


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.timeout(300)
def test_sigterm_to_launcher_saves_and_exits_0_and_the_run_dir_is_locked(tmp_path, start):
    (tmp_path / ".lock").write_text(f"pid={dead_pid()}\nhost={socket.gethostname()}\n")
    run = start(tmp_path)
    deadline = time.time() + 60
    while not (tmp_path / "config.yaml").exists():   # written once the lock is held
        assert time.time() < deadline and run.proc.poll() is None, run.stderr
        time.sleep(0.02)
    second = subprocess.Popen([sys.executable, "-m", "megamoe", "train", *ARGS,
                               "--set", f"run.dir={tmp_path}", "--set", "train.lr=0.00123"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    run.wait_for("step 2/")
    assert "taking over the stale lock" in run.stderr and "process is gone" in run.stderr

    _, err = second.communicate(timeout=120)
    assert second.returncode == 2, err
    assert err.startswith("megamoe: error: run.dir"), err
    assert f"pid {run.proc.pid} on host {socket.gethostname()}" in err
    assert len(err.strip().splitlines()) == 1, err
    assert "0.00123" not in (tmp_path / "config.yaml").read_text()   # nothing written

    procs = run.descendants()
    os.kill(run.proc.pid, signal.SIGTERM)          # the launcher only, as Kubernetes does
    assert run.finish(timeout=60) == 0, run.stderr
    assert "SIGTERM received: saved" in run.stdout, run.stdout
    assert "Traceback" not in run.stderr, run.stderr
    saved = int(run.stdout.split("SIGTERM received: saved")[1].split("at step ")[1].split(";")[0])
    assert latest(tmp_path) == f"step_{saved:07d}"
    assert_all_gone(procs)
    assert (tmp_path / ".lock").read_text() == ""   # released cleanly: no stale-lock warning


@pytest.mark.timeout(300)
def test_second_ctrl_c_stops_at_once(tmp_path, start):
    run = start(tmp_path, *EVERY_STEP)
    run.wait_for("step 2/")
    procs = run.descendants()
    os.killpg(run.proc.pid, signal.SIGINT)         # what the terminal sends the foreground job
    run.wait_for("SIGINT received: the ranks save a checkpoint after this step")
    os.killpg(run.proc.pid, signal.SIGINT)
    assert run.finish(timeout=30) == 130, run.stderr
    assert "stopped at once" in run.stderr and "Traceback" not in run.stderr, run.stderr
    latest(tmp_path)                               # still names a complete checkpoint
    assert_all_gone(procs)


@pytest.mark.timeout(300)
def test_ctrl_c_during_start_up_stops_before_training(tmp_path, start):
    run = start(tmp_path)
    deadline = time.time() + 60
    while len(run.ranks()) < 2:
        assert time.time() < deadline and run.proc.poll() is None, run.stderr
        time.sleep(0.02)
    procs = run.descendants()
    os.killpg(run.proc.pid, signal.SIGINT)         # Ctrl-C while the ranks are importing
    assert run.finish(timeout=120) == 0, run.stderr
    assert "SIGINT received during start-up" in run.stdout, run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr
    assert not (tmp_path / "checkpoints").exists()
    assert_all_gone(procs)


@pytest.mark.timeout(300)
def test_killed_rank_is_named_and_no_process_survives(tmp_path, start):
    run = start(tmp_path, *EVERY_STEP)
    run.wait_for("step 2/")                        # a checkpoint was saved: helpers exist
    procs = run.descendants()
    ranks = run.ranks()
    assert len(ranks) == 2
    assert len(procs) > 3                          # the ranks' own helper processes
    t0 = time.time()
    ranks[1].kill()
    rc = run.finish(timeout=30)
    assert rc == 2 and time.time() - t0 < 15, (rc, run.stderr)
    assert "rank 1 failed: killed by SIGKILL" in run.stderr, run.stderr
    assert "MEGAMOE_TRACEBACK" not in run.stderr, run.stderr
    assert_all_gone(procs)
