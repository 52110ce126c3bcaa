"""Indexed datasets: round trip, Megatron-Core reads what megamoe writes (and the other way),
damaged files give one clear error naming file and offset; GPT samples cut from the stream."""

import os
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from megamoe.data.batches import build_datasets
from megamoe.data.gpt_dataset import GPTSequenceDataset
from megamoe.data.indexed import IndexedDatasetReader, IndexedDatasetWriter

DOCS = [[1, 2, 3], [4, 5], [], [6, 7, 8, 9, 10], [11]]


def _write(prefix, docs=DOCS, dtype=np.uint16):
    with IndexedDatasetWriter(prefix, dtype) as w:
        for d in docs:
            w.add_document(d)
    return prefix


@pytest.fixture
def dataset(tmp_path):
    return _write(str(tmp_path / "ds"))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64, np.uint8])
def test_round_trip(tmp_path, dtype):
    r = IndexedDatasetReader(_write(str(tmp_path / "ds"), dtype=dtype))
    assert len(r) == len(DOCS) and r.dtype == np.dtype(dtype)
    assert [r[i].tolist() for i in range(len(r))] == DOCS
    assert r.doc_lengths.tolist() == [len(d) for d in DOCS]
    assert r.get(3, 1, 3).tolist() == [7, 8, 9]
    assert r.tokens.tolist() == sum(DOCS, []) and r.num_tokens == 11
    with pytest.raises(IndexError):
        r.get(0, 2, 5)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]     # no temporaries left


def test_megatron_reads_what_we_write(dataset):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(dataset)
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS
    assert ds.get(3, offset=1, length=3).tolist() == [7, 8, 9]
    assert ds.document_indices.tolist() == list(range(len(DOCS) + 1))
    assert ds.sequence_lengths.tolist() == [len(d) for d in DOCS]


def test_we_read_what_megatron_writes(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "mg")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in DOCS:
        builder.add_item(torch.tensor(d, dtype=torch.int64))
        builder.end_document()
    builder.finalize(prefix + ".idx")
    r = IndexedDatasetReader(prefix)
    assert [r[i].tolist() for i in range(len(r))] == DOCS and r.dtype == np.int32


def test_interrupted_writer_leaves_nothing(tmp_path):
    prefix = str(tmp_path / "ds")
    with pytest.raises(KeyboardInterrupt):
        with IndexedDatasetWriter(prefix) as w:
            w.add_document([1, 2])
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []
    w = IndexedDatasetWriter(prefix)
    w.add_document([1, 2])                        # not finalized: nothing under the final name
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    w.abort()


def test_token_ids_must_fit_the_dtype(tmp_path):
    w = IndexedDatasetWriter(str(tmp_path / "ds"), np.uint16)
    with pytest.raises(ValueError, match=r"document 0 .*70000.* uint16"):
        w.add_document([1, 70_000])
    w.abort()


def test_missing_files(tmp_path, dataset):
    with pytest.raises(ValueError, match=r"none\.idx: no such file"):
        IndexedDatasetReader(str(tmp_path / "none"))
    os.remove(dataset + ".bin")
    with pytest.raises(ValueError, match=r"ds\.bin: no such file"):
        IndexedDatasetReader(dataset)


def test_truncated_bin_names_file_and_offset(dataset):
    IndexedDatasetReader(dataset)                      # control: the intact dataset opens
    with open(dataset + ".bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"ds\.bin: truncated at offset 10: .* 22 bytes"):
        IndexedDatasetReader(dataset)


def test_trailing_bytes_in_bin(dataset):
    with open(dataset + ".bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValueError, match=r"ds\.bin: offset 22: 2 unexpected trailing bytes"):
        IndexedDatasetReader(dataset)


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("offset,data,message", [
    (0, b"XXXX", r"ds\.idx: offset 0: bad magic"),
    (9, struct.pack("<Q", 2), r"ds\.idx: offset 9: unsupported version 2"),
    (17, struct.pack("<B", 42), r"ds\.idx: offset 17: unknown dtype code 42"),
    (34 + 4 * 5 + 8 * 2, struct.pack("<q", 3), r"ds\.idx: offset 70: pointer of sequence 2"),
])
def test_corrupt_index_names_file_and_offset(dataset, offset, data, message):
    _patch(dataset + ".idx", offset, data)
    with pytest.raises(ValueError, match=message):
        IndexedDatasetReader(dataset)


def test_truncated_index(dataset):
    with open(dataset + ".idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ValueError, match=r"ds\.idx: offset 40: truncated index"):
        IndexedDatasetReader(dataset)


# --- GPTSequenceDataset -----------------------------------------------------------------------

def test_gpt_samples_are_windows_of_the_stream(tmp_path):
    stream = np.arange(1, 102) % 50                    # 101 tokens, ids < 50
    docs = np.split(stream, [7, 30, 31, 64])
    reader = IndexedDatasetReader(_write(str(tmp_path / "ds"), [d.tolist() for d in docs]))
    S = 10                                             # windows [10w, 10w + 11): w = 0 … 9
    train = GPTSequenceDataset(reader, S, seed=3, split="train", valid_fraction=0.2)
    valid = GPTSequenceDataset(reader, S, seed=3, split="valid", valid_fraction=0.2)
    assert (len(train), len(valid)) == (8, 2)
    assert sorted(np.concatenate([train.samples, valid.samples]).tolist()) == list(range(10))
    for ds in (train, valid):
        for i in range(len(ds)):
            w = int(ds.samples[i])
            assert ds[i].dtype == np.int64 and (ds[i] == stream[10 * w:10 * w + 11]).all()
    assert (train.get_batch([2, 0]) == np.stack([train[2], train[0]])).all()
    other = GPTSequenceDataset(reader, S, seed=4, split="train", valid_fraction=0.2)
    assert other.samples.tolist() != train.samples.tolist()      # the seed shuffles


def test_gpt_dataset_too_small(tmp_path):
    reader = IndexedDatasetReader(_write(str(tmp_path / "ds")))    # 11 tokens
    with pytest.raises(ValueError, match=r"ds\.bin: 11 tokens, fewer than one sample of .* 17"):
        GPTSequenceDataset(reader, 16, seed=0, split="train", valid_fraction=0.1)
    with pytest.raises(ValueError, match="leaves none for training"):
        GPTSequenceDataset(reader, 8, seed=0, split="train", valid_fraction=0.1)


def test_build_datasets_indexed(tmp_path):
    prefix = _write(str(tmp_path / "ds"), [list(range(i, i + 30)) for i in range(20)])
    cfg = SimpleNamespace(kind="indexed", path=prefix, tokenizer=None, valid_fraction=0.1)
    train, valid, vocab = build_datasets(cfg, 16, seed=1)
    assert vocab == 49 and train.vocab_size == 49                # max id 48, no tokenizer
    assert len(train) + len(valid) == (600 - 1) // 16 and len(valid) == 4
    assert not set(train.samples) & set(valid.samples)
    cfg.path = str(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"missing\.idx: no such file"):
        build_datasets(cfg, 16, seed=1)
