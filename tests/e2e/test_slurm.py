"""The launch paths on a real Slurm cluster (scripts/slurm_local.sh: munge, slurmctld, two
emulated nodes n1 and n2 on this host) and under OpenMPI's mpirun:
- `mpirun -np 4 megamoe train` (no MASTER_ADDR: rank 0 shares it through mpi4py) trains the
  quickstart recipe; its losses are the reference of the Slurm run and of the same training
  under DeepSpeed's launcher (launchers/deepspeed.sh: `deepspeed --num_gpus 4`, gloo on CPU);
- `megamoe submit` a 2-node x 2-task CPU job, pre-empt it through Slurm (`scancel --signal=USR1
  --batch`: the batch shell forwards it to the step), which saves, requeues itself, resumes and
  finishes with a summary and losses bit-identical, step for step, to the uninterrupted run —
  with both templates (one srun task per rank; one per node running torchrun);
- a health check failed by a real condition (a free-disk threshold above what is free) stops the
  job before training, in one line naming node and check.
Skipped only where the cluster cannot exist (not Linux, not root); a failed bring-up fails."""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "lm_quickstart.yaml")
STEPS = 6
SHORT = ["--set", f"train.steps={STEPS}", "--set", "train.warmup_steps=1",
         "--set", "train.save_interval=0", "--set", "train.eval_interval=0",
         "--set", "train.eval_iters=1", "--set", "run.tensorboard=false",
         "--set", "run.progress=false"]
ENV = {k: v for k, v in os.environ.items()
       if not k.startswith(("SLURM_", "OMPI_", "PMIX_", "TORCHELASTIC_"))
       and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
ENV.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=ROOT,
           OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="the local Slurm cluster needs Linux (scripts/slurm_local.sh)"),
    pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() != 0,
                       reason="bringing up Slurm needs root (apt-get, munge, slurmd)"),
]


@pytest.fixture(scope="session")
def cluster():
    """One bring-up for the session (idempotent: seconds when the cluster is already up)."""
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "slurm_local.sh")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"local Slurm bring-up failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout.strip().splitlines()[-1]


def losses(run_dir) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="session")
def mpirun_run(cluster, tmp_path_factory):
    """The quickstart recipe trained by `mpirun -np 4` (one node, no Slurm)."""
    run_dir = tmp_path_factory.mktemp("mpirun") / "run"
    out = subprocess.run(
        ["mpirun", "--oversubscribe", "-np", "4", sys.executable, "-m", "megamoe", "train",
         "--config", CONFIG, *SHORT, "--set", f"run.dir={run_dir}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return run_dir, out.stdout


@pytest.mark.timeout(480)
def test_mpirun_trains_with_rendezvous_through_mpi4py(mpirun_run):
    run_dir, stdout = mpirun_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["world_size"] == 4, summary
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    assert "layout: TP2·PP1·DP2·EP2" in stdout, stdout[-2000:]


@pytest.mark.timeout(480)
def test_deepspeed_launcher_trains_bit_identical_to_mpirun(mpirun_run, tmp_path):
    """The deepspeed launcher's rank variables (CROSS_RANK, LOCAL_SIZE, RANK, ...) give the same
    ranks and layout as mpirun's, hence the same losses, step for step."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    env = dict(ENV, PYTHON=sys.executable, MASTER_PORT=str(port),
               PATH=os.path.dirname(sys.executable) + os.pathsep + ENV.get("PATH", ""))
    out = subprocess.run(["bash", os.path.join(ROOT, "launchers", "deepspeed.sh"), CONFIG,
                          *SHORT, "--set", f"run.dir={run_dir}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "num_local_procs=4" in out.stdout + out.stderr    # DeepSpeed's launcher started them
    assert "layout: TP2·PP1·DP2·EP2" in out.stdout, out.stdout[-2000:]
    want = losses(mpirun_run[0])
    assert len(want) == STEPS and losses(run_dir) == want


def _wait_for_job(job: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True,
                         text=True).stdout.strip():
        if time.time() > deadline:
            subprocess.run(["scancel", job])
            pytest.fail(f"job {job} still queued or running after {timeout:.0f} s")
        time.sleep(0.2)


def _submit(tmp_path, *extra) -> str:
    out = subprocess.run([sys.executable, "-m", "megamoe", "submit", "--config", CONFIG,
                          "--nodes", "2", *extra], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    match = re.match(r"submitted job (\d+): 2 nodes x 2 ranks; log (\S+),", out.stdout)
    assert match, out.stdout
    return match.group(1)


def _job_field(job: str, name: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                          text=True).stdout
    return re.search(rf"\b{name}=(\S+)", text).group(1)


# (launcher, rank 0's log under logs/<job>/, the line rank 0 writes at step 2 there): one srun
# task per rank writes rank-<N>.log; under torchrun (one srun task per node) torchrun's --tee
# copies rank 0's lines, prefixed "[default0]:", into the first node's log
TEMPLATES = [("srun", "rank-0.log", "step 2/"),
             ("torchrun", "node-0.log", "[default0]:[megamoe] step 2/")]


@pytest.mark.timeout(480)
@pytest.mark.parametrize("launcher,rank0_log,step2", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_submit_preempt_requeue_resumes_bit_identical(cluster, mpirun_run, tmp_path, launcher,
                                                      rank0_log, step2):
    """Either sbatch template: the batch shell forwards USR1 to the step (torchrun ignores it;
    srun delivers it to every rank), the ranks save and stop, the job requeues itself and the
    restarted step resumes to the same losses as the uninterrupted run."""
    run_dir = tmp_path / "run"
    job = _submit(tmp_path, "--launcher", launcher, *SHORT, "--set", f"run.dir={run_dir}")
    rank0 = tmp_path / "logs" / job / rank0_log
    deadline = time.time() + 300
    while not (rank0.exists() and step2 in rank0.read_text()):
        assert time.time() < deadline, f"job {job} never reached step 2"
        time.sleep(0.1)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    _wait_for_job(job, timeout=360)

    batch = (tmp_path / "logs" / f"lm_quickstart-{job}.out").read_text()
    log = rank0.read_text()
    assert _job_field(job, "JobState") == "COMPLETED", batch
    assert _job_field(job, "Restarts") == "1", batch
    saved = re.search(r"SIGUSR1 received: saved \S+ at step (\d+); exiting", log)
    assert saved, log[-3000:]
    step = int(saved.group(1))
    assert 2 <= step < STEPS, step
    assert f"resumed from: {run_dir}/checkpoints/step_{step:07d} (step {step})" in log
    assert "[slurm] requeued run: resuming" in batch, batch
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from_step"] == step, summary
    ref_dir, _ = mpirun_run
    assert losses(run_dir) == losses(ref_dir)   # bit-identical, step for step

    requeued = float(re.search(r"requeueing \S+ at (\S+)", batch).group(1))
    restarted = float(re.search(r"\(restart 1\) started at (\S+)", batch).group(1))
    delay = restarted - requeued
    print(f"requeue delay ({launcher}): {delay:.1f} s (scontrol requeue -> the restarted "
          "batch shell)")
    assert 0 < delay < 30, delay


@pytest.mark.timeout(300)
def test_health_check_on_free_disk_stops_the_job_before_training(cluster, tmp_path):
    free_gib = shutil.disk_usage(tmp_path).free / 2**30
    job = _submit(tmp_path, "--min-free-disk-gb", str(int(free_gib * 10) + 1), *SHORT,
                  "--set", f"run.dir={tmp_path / 'run'}")
    _wait_for_job(job, timeout=240)
    batch = (tmp_path / "logs" / f"lm_quickstart-{job}.out").read_text()
    errors = [ln for ln in batch.splitlines() if ln.startswith("megamoe: error:")]
    assert len(errors) == 1, batch
    assert re.match(r"megamoe: error: health check failed on node n1: free disk: [\d.]+ GiB "
                    r"under runs < \S+ GiB \(--min-free-disk-gb\)$", errors[0]), errors[0]
    assert _job_field(job, "JobState") == "FAILED", batch
    assert not list((tmp_path / "logs" / job).glob("rank-*.log"))   # no rank started
    assert not (tmp_path / "run").exists()
