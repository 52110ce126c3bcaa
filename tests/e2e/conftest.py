import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def megamoe(*args, timeout=600, cwd=None):
    """Run the CLI as a user does; returns the CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "megamoe", *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def cli():
    return megamoe


# A small finished run shared by the tests that only read it or copy it (one training run
# instead of one per test): 2 ranks (EP2), 4 steps, checkpoints at steps 2 and 4, TensorBoard on.
SHARED_RUN_ARGS = ["--config", "configs/lm_quickstart.yaml", "--set", "parallel.world_size=2",
                   "--set", "parallel.tensor=1", "--set", "parallel.expert=2",
                   "--set", "train.steps=4", "--set", "train.warmup_steps=1",
                   "--set", "train.save_interval=2", "--set", "train.eval_interval=0",
                   "--set", "train.eval_iters=1", "--set", "run.tensorboard=true"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The shared run's directory; copy it (shutil.copytree) before changing anything in it."""
    run_dir = tmp_path_factory.mktemp("shared") / "run"
    out = megamoe("train", *SHARED_RUN_ARGS, "--set", f"run.dir={run_dir}")
    assert out.returncode == 0, out.stderr[-2000:]
    return run_dir
