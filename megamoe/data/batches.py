"""Batches as a function of consumed samples, independent of the data-parallel size.

The global batch of a step is samples `consumed, …, consumed + G − 1` (mod the dataset size).
Micro-batch m of DP rank r holds samples `[m·mbs·dp + r·mbs, … + mbs)` of it, so the union over
DP ranks of a step is the same global batch whatever the DP size.
"""

from __future__ import annotations

import numpy as np
import torch


def global_batch_indices(consumed_samples: int, global_batch_size: int,
                         num_samples: int) -> np.ndarray:
    return (consumed_samples + np.arange(global_batch_size)) % num_samples


def _to_batch(samples: list) -> dict:
    tokens = torch.as_tensor(np.stack(samples), dtype=torch.long)
    mbs, s1 = tokens.shape
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": torch.ones(mbs, s1 - 1),
        "position_ids": torch.arange(s1 - 1).expand(mbs, s1 - 1).contiguous(),
    }


def rank_microbatches(dataset, consumed_samples: int, global_batch_size: int,
                      micro_batch_size: int, dp_rank: int, dp_size: int) -> list[dict]:
    idx = global_batch_indices(consumed_samples, global_batch_size, len(dataset))
    per_micro = micro_batch_size * dp_size
    assert global_batch_size % per_micro == 0, (global_batch_size, per_micro)
    out = []
    for m in range(global_batch_size // per_micro):
        start = m * per_micro + dp_rank * micro_batch_size
        out.append(_to_batch([dataset[int(i)] for i in idx[start:start + micro_batch_size]]))
    return out


def build_datasets(data_cfg, seq_length: int, seed: int):
    """(train, valid, vocab_size) for the configured data."""
    if data_cfg.kind == "markov":
        from megamoe.data.markov import MarkovCorpus

        common = dict(vocab_size=data_cfg.markov_vocab_size, branching=data_cfg.markov_branching,
                      seed=data_cfg.markov_seed, seq_length=seq_length)
        train = MarkovCorpus(num_samples=1_000_000, split="train", **common)
        valid = MarkovCorpus(num_samples=4096, split="valid", **common)
        return train, valid, data_cfg.markov_vocab_size
    from megamoe.data.gpt_dataset import build_indexed_datasets

    return build_indexed_datasets(data_cfg, seq_length, seed)
