"""Resume and run-directory failures a user meets: a finished run rerun, an explicit resume
source without a complete checkpoint, a corrupt newest checkpoint, a full disk, a read-only
run directory, a dry run, an extended `train.steps`. The checks that end before any rank starts
call the CLI in this process; the others run it as a user does, on copies of the shared run."""

import json
import math
import os
import shutil
import subprocess

import pytest

from conftest import SHARED_RUN_ARGS, megamoe
from megamoe.cli import main

MIN_LR = 3.0e-4            # configs/lm_quickstart.yaml


def strict_json(text: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers do."""
    def refuse(name):
        raise ValueError(f"not JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def records(run, key="loss"):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(strict_json, lines) if key in r]


def snapshot(run) -> dict:
    """Every file under `run` with its bytes and modification time."""
    out = {}
    for dirpath, _, names in os.walk(run):
        for name in names:
            path = os.path.join(dirpath, name)
            out[path] = (open(path, "rb").read(), os.stat(path).st_mtime_ns)
    return out


def train_in_process(run_dir, *extra):
    return main(["train", *SHARED_RUN_ARGS, "--set", f"run.dir={run_dir}", *extra])


def garble(path):
    """Overwrite a file with zeros of the same size (its size check passes; reading fails)."""
    path.write_bytes(b"\0" * path.stat().st_size)


@pytest.fixture
def run_copy(trained_run, tmp_path):
    return shutil.copytree(trained_run, tmp_path / "run")


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a tmpfs at tmp_path/mnt (root, as on this machine and CI); yields a mount function
    mount(size_bytes) -> path, unmounted at the end."""
    mounted = []

    def mount(size: int):
        where = tmp_path / "mnt"
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                             capture_output=True, text=True)
        if res.returncode:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


# --- checks before any rank starts ---------------------------------------------------------

def test_rerun_of_a_finished_run_changes_nothing(run_copy, capsys):
    before = snapshot(run_copy)
    assert train_in_process(run_copy) == 0
    assert "nothing to do: the run is at step 4 (train.steps=4)" in capsys.readouterr().out
    assert snapshot(run_copy) == before


def test_summary_and_metrics_are_strict_json(trained_run):
    summary = strict_json((trained_run / "summary.json").read_text())
    assert summary["steps"] == 4 and math.isfinite(summary["last_loss"])
    assert [r["step"] for r in records(trained_run)] == [1, 2, 3, 4]
    from megamoe.training.callbacks import json_text

    assert json_text({"loss": float("nan"), "x": [float("inf"), 1.0]}) == \
        '{"loss": null, "x": [null, 1.0]}'


def test_explicit_resume_without_a_complete_checkpoint_is_an_error(run_copy, tmp_path, capsys):
    new = tmp_path / "new"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train_in_process(new, "--set", f"train.resume={empty}") == 2
    assert f"megamoe: error: {empty}: no checkpoint to resume from" in capsys.readouterr().err
    for step in ("step_0000002", "step_0000004"):
        (run_copy / "checkpoints" / step / "meta.json").unlink()
    assert train_in_process(new, "--set", f"train.resume={run_copy}") == 2
    err = capsys.readouterr().err
    assert f"{run_copy}: no complete checkpoint to resume from (step_0000002, step_0000004 " \
           "lack meta.json" in err, err
    assert not new.exists()            # a failed start leaves no run directory


def test_explicit_truncated_step_dir_is_an_error(run_copy, tmp_path, capsys):
    step = run_copy / "checkpoints" / "step_0000004"
    os.truncate(step / "__1_0.distcp", 100)
    assert train_in_process(tmp_path / "new", "--set", f"train.resume={step}",
                            "--set", "train.steps=6") == 2
    err = capsys.readouterr().err
    assert f"{step}: corrupt: __1_0.distcp has 100 bytes" in err, err


def test_dry_run_creates_no_run_dir(tmp_path, capsys):
    assert main(["train", *SHARED_RUN_ARGS, "--dry-run", "--set",
                 f"run.dir={tmp_path / 'dry'}"]) == 0
    assert "world_size: 2" in capsys.readouterr().out
    assert not (tmp_path / "dry").exists()


def test_read_only_run_dir_is_one_line_error(tmpfs, capsys):
    mnt = tmpfs(1 << 20)
    (mnt / "run").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    assert train_in_process(mnt / "run") == 2
    err = capsys.readouterr().err
    # the first write is the run.dir lock (megamoe.launch.lock): one line, path and cause
    assert err.count("\n") == 1 and err.startswith("megamoe: error: ")
    assert str(mnt / "run") in err and err.endswith(": Read-only file system\n")


# --- ranks ---------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_corrupt_newest_checkpoint_is_skipped_and_repeated_records_dropped(run_copy):
    """Garbled step 4 (sizes intact, so every rank fails reading it): the ranks agree to load
    step 2 and redo steps 3-4; metrics.jsonl and TensorBoard keep each step once. train.steps
    is extended to 6: the LR stays at its minimum, and a warning says so."""
    garble(run_copy / "checkpoints" / "step_0000004" / "common.pt")
    out = megamoe("train", *SHARED_RUN_ARGS, "--set", f"run.dir={run_copy}",
                  "--set", "train.steps=6")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"WARNING: {run_copy}/checkpoints/step_0000004: cannot load" in out.stdout, out.stdout
    assert f"resumed from: {run_copy}/checkpoints/step_0000002 (step 2)" in out.stdout
    assert "the LR stays at train.min_lr (0.0003) after it; set train.reset_schedule=true" \
        in out.stdout
    steps = records(run_copy)
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in steps[4:]] == [MIN_LR, MIN_LR]
    strict_json((run_copy / "summary.json").read_text())
    assert tensorboard_purges(run_copy / "tensorboard") == [3]


def tensorboard_purges(log_dir) -> list[int]:
    """Steps at which an event file tells TensorBoard to drop the earlier events of the same
    and later steps (SummaryWriter's purge_step, written as a SessionLog START)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.compat.proto.event_pb2 import SessionLog

    starts = []
    for name in sorted(os.listdir(log_dir)):
        for event in EventFileLoader(os.path.join(log_dir, name)).Load():
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                starts.append(event.step)
    return starts


@pytest.mark.timeout(300)
def test_garbled_explicit_step_dir_fails_on_the_ranks_and_leaves_no_run_dir(run_copy, tmp_path):
    step = run_copy / "checkpoints" / "step_0000004"
    garble(step / "common.pt")
    new = tmp_path / "new"
    out = megamoe("train", *SHARED_RUN_ARGS, "--set", "parallel.world_size=1",
                  "--set", "parallel.expert=1", "--set", f"run.dir={new}",
                  "--set", f"train.resume={step}", "--set", "train.steps=6")
    assert out.returncode == 2
    assert f"CheckpointError: {step}: cannot load:" in out.stderr, out.stderr[-2000:]
    assert not new.exists()


@pytest.fixture(scope="module")
def full_disk_resume(trained_run, tmp_path_factory):
    """Step 4 of the shared run copied alone onto a tmpfs with less room than one more
    checkpoint, then resumed to step 6 with train.reset_schedule: the steps run, the final save
    runs out of space. (Without a tmpfs, the resume runs on a normal directory.)"""
    base = tmp_path_factory.mktemp("full")
    run, mnt = base / "run", base / "mnt"
    step4 = trained_run / "checkpoints" / "step_0000004"
    used = sum(f.stat().st_size for f in trained_run.rglob("*") if f.is_file()
               and "step_0000002" not in str(f))
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={used + (2 << 20)}", "tmpfs",
                              str(mnt)], capture_output=True).returncode == 0
    if mounted:
        run = mnt / "run"
    shutil.copytree(trained_run, run, ignore=lambda d, names: ["step_0000002"])
    (run / "checkpoints" / "latest").write_text("step_0000004\n")
    try:
        out = megamoe("train", *SHARED_RUN_ARGS, "--set", f"run.dir={run}",
                      "--set", "train.steps=6", "--set", "train.reset_schedule=true")
        yield out, run, mounted, step4
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.timeout(300)
def test_reset_schedule_decays_again_over_the_extended_steps(full_disk_resume):
    out, run, _, _ = full_disk_resume
    lrs = [r["lr"] for r in records(run)]
    assert lrs[4] == pytest.approx(3.0e-3) and MIN_LR < lrs[5] < lrs[4], lrs   # steps 5, 6
    assert "LR schedule: re-planned (train.reset_schedule): 0.003 at step 4 decaying to " \
           "0.0003 at step 6" in out.stdout, out.stdout


@pytest.mark.timeout(300)
def test_full_disk_is_one_line_error_and_keeps_the_previous_checkpoint(full_disk_resume):
    out, run, mounted, _ = full_disk_resume
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("megamoe: error:")]
    assert len(errors) == 1, out.stderr
    assert f"{run}/checkpoints/.tmp-step_0000006: cannot save the checkpoint: No space left " \
        "on device" in errors[0] and "; step_0000004 is intact" in errors[0], errors[0]
    ckpt = run / "checkpoints"
    assert sorted(os.listdir(ckpt)) == ["latest", "step_0000004"]   # the partial one removed
    assert (ckpt / "latest").read_text() == "step_0000004\n"
    from megamoe.checkpoint.load import damage

    assert damage(str(ckpt / "step_0000004")) == []
