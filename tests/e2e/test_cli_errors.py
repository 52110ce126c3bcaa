"""The CLI's help and its refusals: one line naming the field or file, exit code 2, no traceback,
before any rank starts."""

import pytest


def test_help_lists_commands(cli):
    out = cli("--help", timeout=120)
    assert out.returncode == 0
    assert "train" in out.stdout and "specs" in out.stdout


def test_train_help_describes_every_option(cli):
    out = cli("train", "--help", timeout=120)
    assert out.returncode == 0
    for option in ("--config", "--set", "--dry-run", "KEY=VALUE"):
        assert option in out.stdout


def test_specs_lists_topk(cli):
    out = cli("specs", timeout=120)
    assert out.returncode == 0 and "topk" in out.stdout


@pytest.mark.parametrize("args,needle", [
    (["--set", "model.moe.topk=9"], "model.moe.topk"),
    (["--set", "model.moe.topk_x=1"], "model.moe.topk_x"),
    (["--set", "train.lr=-1"], "train.lr"),
    (["--set", "train.micro_batch_size=0"], "train.micro_batch_size"),
    (["--set", "parallel.world_size=3"], "parallel.world_size"),
    (["--set", "parallel.tensor=3", "--set", "parallel.world_size=6"], "parallel.tensor"),
    (["--set", "parallel.expert=3"], "parallel.expert"),
    (["--set", "train.lr=abc"], "train.lr"),
    (["--set", "train.lr"], "train.lr"),
    (["--set", "parallel.expert_tensor=0"], "parallel.expert_tensor"),
])
def test_bad_configuration_is_one_clear_line(cli, args, needle):
    out = cli("train", "--config", "configs/lm_quickstart.yaml", *args, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_missing_config_file_names_the_file(cli):
    out = cli("train", "--config", "configs/nope.yaml", timeout=120)
    assert out.returncode == 2 and "configs/nope.yaml" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args,needle", [
    (["--set", "data.kind=indexed", "--set", "data.path={tmp}/corpus"],
     "data.path: {tmp}/corpus.bin: no such file"),
    (["--set", "data.tokenizer={tmp}/tok.model"], "data.tokenizer: {tmp}/tok.model: no such file"),
    (["--set", "train.resume={tmp}/old-run"], "train.resume: {tmp}/old-run: no such file"),
    (["--set", "train.lr=inf"], "train.lr: must be a finite number, got inf"),
], ids=["data", "tokenizer", "resume", "lr_inf"])
def test_inputs_are_checked_before_any_rank_starts(cli, tmp_path, args, needle):
    """Refused in the launching process, within seconds (ranks would take 10-80 s to get
    there); the run directory is not even created."""
    import time

    run_dir = tmp_path / "run"
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    start = time.perf_counter()
    out = cli("train", "--config", "configs/lm_quickstart.yaml", "--set", f"run.dir={run_dir}",
              *args, timeout=120)
    elapsed = time.perf_counter() - start
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith("megamoe: error: " + needle.replace("{tmp}", str(tmp_path)))
    assert not run_dir.exists() and elapsed < 15, elapsed
