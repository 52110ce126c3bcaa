"""Samples of `seq_length + 1` tokens cut from the concatenated documents of an indexed dataset.

Sample i is a fixed window of the token stream (documents carry their EOS); the windows are
permuted with `seed`, and the last `valid_fraction` of the permutation is the validation split.
"""

from __future__ import annotations

import numpy as np

from megamoe.data.indexed import IndexedDatasetReader


class GPTSequenceDataset:
    def __init__(self, reader: IndexedDatasetReader, seq_length: int, seed: int, split: str,
                 valid_fraction: float, vocab_size: int | None = None):
        self.reader, self.seq_length, self.vocab_size = reader, seq_length, vocab_size
        self.starts = np.concatenate([[0], np.cumsum(reader.doc_lengths.astype(np.int64))])
        total = int(self.starts[-1])
        n = (total - 1) // seq_length
        if n < 2:
            raise ValueError(f"{reader.prefix}: {total} tokens, fewer than two samples of "
                             f"{seq_length + 1} tokens (model.seq_length)")
        perm = np.random.default_rng(seed).permutation(n)
        n_valid = max(1, int(round(n * valid_fraction)))
        self.samples = perm[n - n_valid:] if split == "valid" else perm[:n - n_valid]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.samples[i % len(self.samples)]) * self.seq_length
        end = start + self.seq_length + 1
        doc = int(np.searchsorted(self.starts, start, side="right")) - 1
        out, pos = [], start
        while pos < end:
            offset = pos - int(self.starts[doc])
            take = min(end - pos, int(self.reader.doc_lengths[doc]) - offset)
            out.append(self.reader.get(doc, offset, take))
            pos += take
            doc += 1
        return np.concatenate(out).astype(np.int64)


def build_indexed_datasets(data_cfg, seq_length: int, seed: int):
    reader = IndexedDatasetReader(data_cfg.path)
    if data_cfg.tokenizer:
        from megamoe.data.tokenizer import SentencePieceTokenizer

        vocab = SentencePieceTokenizer(data_cfg.tokenizer).vocab_size
    else:
        vocab = int(max(int(reader.get(d).max()) for d in range(len(reader)) if
                        reader.doc_lengths[d] > 0)) + 1
    train = GPTSequenceDataset(reader, seq_length, seed, "train", data_cfg.valid_fraction, vocab)
    valid = GPTSequenceDataset(reader, seq_length, seed, "valid", data_cfg.valid_fraction, vocab)
    return train, valid, vocab
