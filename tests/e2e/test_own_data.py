"""A user's own corpus: JSONL → preprocess_data → megamoe train on the indexed dataset, under
TP2 × EP2 with a 47-piece tokenizer: the vocabulary is padded for TP (Megatron refuses a vocabulary
that TP does not divide) and the start-up lines say so."""

import json
import random
import subprocess
import sys

import pytest

import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.timeout(600)
def test_train_on_preprocessed_jsonl(cli, tmp_path):
    rng = random.Random(1)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n")
    prefix = tmp_path / "data" / "corpus"
    out = subprocess.run([sys.executable, "tools/preprocess_data.py", "--input",
                          str(tmp_path / "corpus.jsonl"), "--output-prefix", str(prefix),
                          "--vocab-size", "47", "--no-progress"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "(47 pieces)" in out.stdout, out.stdout     # odd: TP2 needs padding
    run_dir = tmp_path / "run"
    out = cli("train", "--set", "parallel.world_size=2", "--set", "parallel.expert=2",
              "--set", "parallel.tensor=2", "--set", "parallel.expert_tensor=1",
              "--set", "data.kind=indexed", "--set", f"data.path={prefix}",
              "--set", f"data.tokenizer={prefix}.model", "--set", "train.steps=8",
              "--set", "train.warmup_steps=2", "--set", "train.eval_interval=0",
              "--set", "model.seq_length=32", "--set", f"run.dir={run_dir}", timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert ("vocab: 47 (padded to 256 for TP2: make_vocab_size_divisible_by 128 × TP 2"
            in out.stdout), out.stdout[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["last_loss"] < summary["first_loss"]
