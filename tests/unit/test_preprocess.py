"""tools/preprocess_data.py: JSONL -> sentencepiece tokenizer + Megatron dataset; bad input is
one message naming file and line, exit code 2, and no output files."""

import json
import os
import random
import re
from types import SimpleNamespace

import numpy as np
import pytest

from megamoe.data.batches import build_datasets
from megamoe.data.indexed import IndexedDatasetReader
from megamoe.data.tokenizer import SentencePieceTokenizer
from tools import preprocess_data

SUBJECTS = "the cat|a small dog|my old teacher|the red bird|every child|our neighbour".split("|")
VERBS = "sees|likes|follows|paints|finds|remembers".split("|")
OBJECTS = "the river|a green house|the tall tree|an open door|the morning sun".split("|")


def _sentences(n, seed=0):
    rng = random.Random(seed)
    for _ in range(n):
        k = rng.randint(1, 3)
        yield " ".join(f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} "
                       f"{rng.choice(OBJECTS)}." for _ in range(k))


def _jsonl(path, n=200, key="text"):
    docs = list(_sentences(n))
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({key: d, "id": 1}) + "\n")
    return docs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The corpus preprocessed once with a trained 96-piece tokenizer."""
    tmp = tmp_path_factory.mktemp("pre")
    docs = _jsonl(tmp / "c.jsonl")
    prefix = str(tmp / "out" / "c")
    rc = preprocess_data.main(["--input", str(tmp / "c.jsonl"), "--output-prefix", prefix,
                               "--vocab-size", "96", "--no-progress"])
    assert rc == 0
    return tmp, docs, prefix


def test_jsonl_to_dataset(built, capsys):
    tmp, docs, prefix = built
    assert sorted(os.listdir(tmp / "out")) == ["c.bin", "c.idx", "c.model"]
    tok = SentencePieceTokenizer(prefix + ".model")
    assert tok.vocab_size <= 96 and tok.eos_id == 3 and tok.pad_id == 0
    r = IndexedDatasetReader(prefix)
    assert len(r) == 200
    for i in (0, 57, 199):
        assert r[i][-1] == tok.eos_id and tok.decode(r[i][:-1]) == docs[i]
    assert r.num_tokens < sum(len(d) for d in docs) / 2          # BPE merges characters

    from megatron.core.datasets.indexed_dataset import IndexedDataset

    mg = IndexedDataset(prefix)
    assert all((mg[i] == r[i]).all() for i in range(len(r)))


def test_existing_tokenizer_and_no_eos(built, tmp_path, capsys):
    src, docs, prefix = built
    out = str(tmp_path / "again")
    rc = preprocess_data.main(["--input", str(src / "c.jsonl"), "--output-prefix", out,
                               "--tokenizer", prefix + ".model", "--no-append-eos",
                               "--no-progress"])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "200 documents" in summary and "tokens" in summary
    a, b = IndexedDatasetReader(prefix), IndexedDatasetReader(out)
    assert all(a[i][:-1].tolist() == b[i].tolist() for i in range(200))
    assert not os.path.exists(out + ".model")


def test_build_datasets_from_preprocessed(built):
    _, _, prefix = built
    cfg = SimpleNamespace(kind="indexed", path=prefix, tokenizer=prefix + ".model",
                          valid_fraction=0.1)
    train, valid, vocab = build_datasets(cfg, 16, seed=1)
    assert vocab == SentencePieceTokenizer(prefix + ".model").vocab_size
    assert train[0].shape == (17,) and int(np.max(train[0])) < vocab
    assert not set(train.samples) & set(valid.samples)


def test_tokenizer_that_does_not_fit_the_data(built, tmp_path):
    _, _, prefix = built
    small = tmp_path / "s.jsonl"
    small.write_text('{"text": "ab ba"}\n' * 20)
    assert preprocess_data.main(["--input", str(small), "--output-prefix", str(tmp_path / "s"),
                                 "--vocab-size", "8", "--no-progress"]) == 0
    cfg = SimpleNamespace(kind="indexed", path=prefix, tokenizer=str(tmp_path / "s.model"),
                          valid_fraction=0.1)
    with pytest.raises(ValueError, match=r"token id \d+ does not fit .*s\.model"):
        build_datasets(cfg, 16, seed=1)


@pytest.mark.parametrize("bad_line,message", [
    ("{not json}", r"invalid JSON"),
    ('{"body": "no text key"}', r"no 'text' field"),
    ('{"text": 17}', r"'text' must be a string, not int"),
    ('["text"]', r"no 'text' field"),
])
def test_bad_line_names_file_and_line(tmp_path, capsys, bad_line, message):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": s}) for s in _sentences(5)]
    lines.insert(3, "")                                  # blank lines are skipped, but counted
    lines.insert(5, bad_line)                            # line 6
    path.write_text("\n".join(lines) + "\n")
    rc = preprocess_data.main(["--input", str(path), "--output-prefix", str(tmp_path / "o" / "b"),
                               "--vocab-size", "32", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert re.search(re.escape(f"{path}:6: ") + message, err), err
    assert os.listdir(tmp_path) == ["bad.jsonl"]          # no output, not even a directory


def test_missing_input_and_tokenizer(tmp_path, capsys):
    assert preprocess_data.main(["--input", str(tmp_path / "none.jsonl"),
                                 "--output-prefix", str(tmp_path / "x")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    _jsonl(tmp_path / "c.jsonl", n=3)
    assert preprocess_data.main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix",
                                 str(tmp_path / "x"), "--tokenizer",
                                 str(tmp_path / "c.jsonl")]) == 2
    assert "c.jsonl: not a valid sentencepiece model" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl"]


def test_help_lists_every_option(capsys):
    assert preprocess_data.main(["--help"]) == 0
    out = capsys.readouterr().out
    for opt in ("--input", "--json-key", "--output-prefix", "--tokenizer", "--vocab-size",
                "--append-eos", "--no-append-eos", "--no-progress"):
        assert opt in out
    assert preprocess_data.main([]) == 2                   # usage error, no traceback
