"""`megamoe generate`: a Mixture-of-Recursions checkpoint trained under EP2 generates on one
process with depth-wise batching; its greedy tokens are those of repeated full forwards of the
same checkpoint. Bad input (token ids outside the vocabulary, text without a tokenizer, a
missing checkpoint) is one clear error."""

import re

import pytest
import torch

from megamoe.testing.pool import run_distributed

TRAIN = ["--set", "train.steps=3", "--set", "train.warmup_steps=1",
         "--set", "train.eval_interval=0", "--set", "train.eval_iters=1",
         "--set", "run.tensorboard=false", "--set", "run.progress=false"]
PROMPTS = [[5, 9, 2], [7]]
NEW = 6


def greedy_by_full_forward(step_dir: str, prompt: list, new: int) -> list:
    from megamoe.commands.convert import checkpoint_config
    from megamoe.checkpoint.load import load_checkpoint, read_meta
    from megamoe.engines.megatron import build_engine

    cfg = checkpoint_config(step_dir)
    engine = build_engine(cfg, int(read_meta(step_dir)["vocab_size"]), torch.device("cpu"),
                          with_optimizer=False, ddp=False)
    load_checkpoint(engine, step_dir, load_optimizer=False)
    model = engine.modules[0].eval()
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            ids = torch.tensor([tokens])
            logits = model(ids, torch.arange(len(tokens))[None], None)
            tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def mor_run(tmp_path_factory):
    from conftest import megamoe

    run = tmp_path_factory.mktemp("gen") / "run"
    out = megamoe("train", "--config", "configs/mor_token.yaml", *TRAIN,
                  "--set", f"run.dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    return run


@pytest.mark.timeout(600)
def test_generate_matches_greedy_full_forward(cli, mor_run):
    args = [a for p in PROMPTS for a in ("--prompt-ids", " ".join(map(str, p)))]
    out = cli("generate", str(mor_run), *args, "--max-new-tokens", str(NEW), "--batch", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    got = [list(map(int, line.split("] ", 1)[1].split()))
           for line in out.stdout.splitlines() if line.startswith("[ids]")]
    assert [len(g) for g in got] == [NEW] * len(PROMPTS)
    assert re.search(r"\d+ tokens in [\d.]+ s \([\d.]+ tokens/s, depth-wise", out.stdout)
    step_dir = str(mor_run / "checkpoints" /
                   (mor_run / "checkpoints" / "latest").read_text().strip())
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == run_distributed(greedy_by_full_forward, 1, step_dir, prompt, NEW)[0]


@pytest.mark.timeout(600)
def test_generate_bad_input_is_one_clear_error(cli, mor_run, tmp_path):
    out = cli("generate", str(mor_run), "--prompt-ids", "3 999")
    assert out.returncode == 2 and "prompt 0: token ids [999] outside 0..63" in out.stderr
    assert "Traceback" not in out.stderr
    out = cli("generate", str(mor_run), "--prompt", "hello", "--batch", "0")
    assert out.returncode == 2 and "--batch=0: must be ≥ 1" in out.stderr
    out = cli("generate", str(mor_run), "--prompt", "hello")
    assert out.returncode == 2 and "no data.tokenizer" in out.stderr
    out = cli("generate", str(tmp_path / "none"), "--prompt-ids", "1")
    assert out.returncode == 2 and "no such checkpoint directory" in out.stderr


@pytest.mark.timeout(600)
def test_generate_leaves_no_process_group_for_exit(mor_run):
    """A process group left to interpreter exit can abort the process after its work is done
    (gloo threads destroyed while joinable: "terminate called without an active exception",
    exit -6, seen under load); `main` ends it on the error path too."""
    import subprocess
    import sys

    code = ("import sys, torch.distributed as dist; from megamoe.cli import main; "
            f"rc = main(['generate', {str(mor_run)!r}, '--prompt-ids', '3 999']); "
            "print(rc, dist.is_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.split()[-2:] == ["2", "False"], out
