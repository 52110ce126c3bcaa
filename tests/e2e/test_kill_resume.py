"""Kill -9 a training job between steps and in the middle of a save; the resumed job picks the
newest complete checkpoint and reproduces the uninterrupted run's losses exactly (CPU fp32)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ARGS = ["--config", "configs/lm_quickstart.yaml", "--set", "parallel.world_size=2",
        "--set", "parallel.tensor=1", "--set", "parallel.expert=2", "--set", "train.steps=12",
        "--set", "train.warmup_steps=2", "--set", "train.save_interval=1",
        "--set", "train.eval_interval=0", "--set", "train.eval_iters=1",
        "--set", "run.tensorboard=false"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def start(run_dir):
    return subprocess.Popen([sys.executable, "-m", "megamoe", "train", *ARGS,
                             "--set", f"run.dir={run_dir}"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def losses(run_dir):
    """Loss per step, the last record of each step (steps after the checkpoint are re-run)."""
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def kill_when(proc, condition, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail("training finished before the kill point")
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("kill point never reached")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("straight"))
    assert start(run_dir).wait(timeout=300) == 0
    return losses(run_dir)


def _resume_and_compare(run_dir, reference):
    assert start(run_dir).wait(timeout=300) == 0
    assert losses(run_dir) == reference


@pytest.mark.timeout(600)
def test_kill_between_steps(tmp_path, uninterrupted):
    ckpt = tmp_path / "checkpoints"
    proc = start(tmp_path)
    kill_when(proc, lambda: (ckpt / "step_0000004" / "meta.json").exists())
    _resume_and_compare(tmp_path, uninterrupted)


@pytest.mark.timeout(600)
def test_kill_during_save(tmp_path, uninterrupted):
    ckpt = tmp_path / "checkpoints"

    def saving():
        return ckpt.is_dir() and any(n.startswith(".tmp-step_0000005") for n in os.listdir(ckpt))

    proc = start(tmp_path)
    kill_when(proc, saving)
    names = os.listdir(ckpt)
    latest = (ckpt / "latest").read_text().strip()
    assert (ckpt / latest / "meta.json").exists(), (latest, names)  # never an incomplete one
    assert not (ckpt / "step_0000005").exists() or (ckpt / "step_0000005" / "meta.json").exists()
    _resume_and_compare(tmp_path, uninterrupted)
