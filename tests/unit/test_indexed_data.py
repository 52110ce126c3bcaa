"""Indexed datasets: Megatron-Core reads what megamoe writes; corrupt files get one clear error;
tools/preprocess_data.py turns JSONL into a dataset and names the bad line of bad input."""

import json
import random

import numpy as np
import pytest

from megamoe.data.indexed import IndexedDatasetReader, IndexedDatasetWriter
from tools import preprocess_data

DOCS = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]


@pytest.fixture
def dataset(tmp_path):
    prefix = str(tmp_path / "ds")
    w = IndexedDatasetWriter(prefix, np.uint16)
    for d in DOCS:
        w.add_document(d)
    w.finalize()
    return prefix


def test_round_trip(dataset):
    r = IndexedDatasetReader(dataset)
    assert [r[i].tolist() for i in range(len(r))] == DOCS
    assert r.get(2, 1, 3).tolist() == [7, 8, 9]


def test_megatron_reads_what_we_write(dataset):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(dataset)
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS


def test_truncated_bin_names_file_and_offset(dataset):
    with open(dataset + ".bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"ds\.bin: truncated at offset 10"):
        IndexedDatasetReader(dataset)


def test_bad_magic_names_the_index(dataset):
    with open(dataset + ".idx", "r+b") as f:
        f.write(b"XXXX")
    with pytest.raises(ValueError, match=r"ds\.idx: offset 0: bad magic"):
        IndexedDatasetReader(dataset)


def test_missing_files(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        IndexedDatasetReader(str(tmp_path / "none"))


def _corpus(path, n=200):
    rng = random.Random(0)
    words = "the cat dog sat on a mat and ran to big small red blue tree house".split()
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30))}) + "\n")


def test_preprocess_trains_a_tokenizer_and_writes_a_dataset(tmp_path):
    _corpus(tmp_path / "c.jsonl")
    prefix = str(tmp_path / "out" / "c")
    rc = preprocess_data.main(["--input", str(tmp_path / "c.jsonl"), "--output-prefix", prefix,
                               "--vocab-size", "64", "--no-progress"])
    assert rc == 0
    r = IndexedDatasetReader(prefix)
    assert len(r) == 200 and r.num_tokens > 200
    from megamoe.data.tokenizer import SentencePieceTokenizer

    tok = SentencePieceTokenizer(prefix + ".model")
    assert tok.decode(r[0][:-1]).split()[0] in "the cat dog sat on a mat and ran to big small red blue tree house".split()
    assert r[0][-1] == tok.eos_id

    from types import SimpleNamespace

    from megamoe.data.batches import build_datasets

    cfg = SimpleNamespace(kind="indexed", path=prefix, tokenizer=prefix + ".model",
                          valid_fraction=0.1)
    train, valid, vocab = build_datasets(cfg, 16, seed=1)
    assert vocab == tok.vocab_size and len(train[0]) == 17
    assert len(set(train.samples) & set(valid.samples)) == 0


def test_preprocess_bad_line_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "fine"}\n{not json}\n')
    prefix = str(tmp_path / "bad")
    assert preprocess_data.main(["--input", str(path), "--output-prefix", prefix]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl:3: invalid JSON" in err and "Traceback" not in err
    assert not (tmp_path / "bad.bin").exists() and not (tmp_path / "bad.idx").exists()
