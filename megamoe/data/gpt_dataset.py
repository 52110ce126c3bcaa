"""Samples of `seq_length + 1` tokens cut from the concatenated documents of an indexed dataset.

The documents (each already ending with EOS) are one token stream; window w is tokens
`[w·S, w·S + S + 1)`, so consecutive windows share one token and there are ⌊(T − 1)/S⌋ of them.
The windows are permuted with `seed`; the last `valid_fraction` of the permutation (at least one
window) is the validation split, the rest the training split.
"""

from __future__ import annotations

import numpy as np

from megamoe.data.indexed import IndexedDatasetReader

SPLITS = ("train", "valid")


class GPTSequenceDataset:
    """Sample i of a split -> int64 array of `seq_length + 1` tokens (same contract as
    MarkovCorpus)."""

    def __init__(self, reader: IndexedDatasetReader, seq_length: int, seed: int, split: str,
                 valid_fraction: float, vocab_size: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0 <= valid_fraction < 1:
            raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
        self.reader, self.seq_length, self.vocab_size = reader, seq_length, vocab_size
        self.tokens = reader.tokens
        total, S = len(self.tokens), seq_length
        if total < S + 1:
            raise ValueError(f"{reader.bin_path}: {total} tokens, fewer than one sample of "
                             f"seq_length + 1 = {S + 1} tokens")
        n = (total - 1) // S
        n_valid = max(1, round(n * valid_fraction)) if valid_fraction > 0 else 0
        if n_valid >= n:
            raise ValueError(f"{reader.bin_path}: {total} tokens make {n} samples of {S + 1} "
                             f"tokens; valid_fraction={valid_fraction} leaves none for training")
        if split == "valid" and n_valid == 0:
            raise ValueError("valid split requested with valid_fraction=0")
        perm = np.random.default_rng(seed).permutation(n)
        self.samples = perm[n - n_valid:] if split == "valid" else perm[:n - n_valid]
        self.split = split

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.samples[i]) * self.seq_length
        return self.tokens[start:start + self.seq_length + 1].astype(np.int64)

    def get_batch(self, indices) -> np.ndarray:
        """[n, S+1] int64 for sample indices `indices` of this split."""
        starts = self.samples[np.asarray(indices, dtype=np.int64)] * self.seq_length
        return self.tokens[starts[:, None] + np.arange(self.seq_length + 1)].astype(np.int64)


def build_indexed_datasets(data_cfg, seq_length: int, seed: int):
    """(train, valid, vocab_size) from `data_cfg.path`; vocab from `data_cfg.tokenizer` if set,
    else the largest token id + 1 (one pass over the tokens)."""
    reader = IndexedDatasetReader(data_cfg.path)
    max_id = int(reader.tokens.max()) if reader.num_tokens else 0
    if data_cfg.tokenizer:
        from megamoe.data.tokenizer import SentencePieceTokenizer

        vocab = SentencePieceTokenizer(data_cfg.tokenizer).vocab_size
        if max_id >= vocab:
            raise ValueError(f"{reader.bin_path}: token id {max_id} does not fit the "
                             f"{vocab}-piece tokenizer {data_cfg.tokenizer} (data.tokenizer): "
                             "was the dataset made with another tokenizer?")
    else:
        vocab = max_id + 1
    train, valid = (GPTSequenceDataset(reader, seq_length, seed, split, data_cfg.valid_fraction,
                                       vocab) for split in SPLITS)
    return train, valid, vocab
