"""A mis-set launcher environment stops `megamoe train` before any rank starts, with the one
line of megamoe.launch.env (the unit tests cover every case; this is the CLI path)."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLEAN = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "PMIX_", "PMI_", "TORCHELASTIC_"))
         and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("extra,expected", [
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "4", "PMIX_RANK": "2"},
     "megamoe: error: OMPI_COMM_WORLD_RANK=1 but PMIX_RANK=2: two launchers' variables disagree "
     "about this process's rank"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"},
     "megamoe: error: parallel.world_size: 4 but the launcher started 2 ranks (env)"),
])
def test_mis_set_environment_is_one_error_line(extra, expected, tmp_path):
    env = dict(CLEAN, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, **extra)
    out = subprocess.run([sys.executable, "-m", "megamoe", "train", "--config",
                          "configs/lm_quickstart.yaml", "--set", f"run.dir={tmp_path / 'run'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [expected], out.stderr
    assert not (tmp_path / "run").exists()
