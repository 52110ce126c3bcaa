"""The data order as a function of consumed samples, independent of the data-parallel size.

Rule. With G = global batch size, b = micro-batch size, D = DP size, M = G / (b·D):
  * the global batch of the step that starts after `consumed` samples is dataset indices
    (consumed + j) mod N, j = 0 … G − 1 (no per-epoch reshuffle: datasets are already shuffled);
  * micro-batch m of DP rank r holds positions [m·b·D + r·b, m·b·D + (r + 1)·b) of it.
Hence, for a step:
  * the union of samples over all ranks and micro-batches is the same for every D (and b);
  * micro-batch m concatenated over ranks 0 … D−1 is positions [m·b·D, (m + 1)·b·D): the same
    for every (b, D) with equal b·D. A one-process reference that wants the micro-batches of a
    DP=2 run calls `rank_microbatches(..., dp_rank=r, dp_size=2)` for r = 0, 1 and concatenates
    micro-batch m of both along the batch dimension.
"""

from __future__ import annotations

import numpy as np
import torch



def global_batch_indices(consumed_samples: int, global_batch_size: int,
                         num_samples: int) -> np.ndarray:
    """Dataset indices of the next global batch, wrapping around the dataset."""
    return (consumed_samples + np.arange(global_batch_size, dtype=np.int64)) % num_samples


def _fetch(dataset, indices: np.ndarray) -> np.ndarray:
    if hasattr(dataset, "get_batch"):
        return dataset.get_batch(indices)
    return np.stack([dataset[int(i)] for i in indices])


def to_microbatch(samples_BS1: np.ndarray, first_sample: int | None = None) -> dict:
    """[b, S+1] samples -> the micro-batch dict: tokens/labels/position_ids [b, S] int64,
    loss_mask [b, S] float32 and, given the global position of its first sample,
    sample_index [b] int64 (positions first_sample … first_sample + b − 1)."""
    x_BS1 = torch.as_tensor(np.asarray(samples_BS1), dtype=torch.long)
    b, s = x_BS1.shape[0], x_BS1.shape[1] - 1
    stamp = {} if first_sample is None else {
        "sample_index": torch.arange(first_sample, first_sample + b, dtype=torch.int64)}
    return {**stamp,
        "tokens": x_BS1[:, :-1].contiguous(),
        "labels": x_BS1[:, 1:].contiguous(),
        "loss_mask": torch.ones(b, s, dtype=torch.float32),
        "position_ids": torch.arange(s).expand(b, s).contiguous(),
    }


def collate_tokens(samples_BS1: np.ndarray, sample_index_B) -> dict:
    """The token micro-batch (`to_microbatch`) with each sample's global position in the data
    order (`sample_index` [b] int64, unique over training: megamoe.data.loader)."""
    batch = to_microbatch(samples_BS1)
    batch["sample_index"] = torch.as_tensor(np.asarray(sample_index_B), dtype=torch.long)
    return batch


def rank_microbatches(dataset, consumed_samples: int, global_batch_size: int,
                      micro_batch_size: int, dp_rank: int, dp_size: int) -> list[dict]:
    """The token micro-batches DP rank `dp_rank` of `dp_size` processes in the step that starts
    after `consumed_samples` samples (rule in the module docstring; megamoe.data.loader)."""
    from megamoe.data.loader import DataLoader

    loader = DataLoader(dataset, collate_tokens, global_batch_size=global_batch_size,
                        micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    return loader.peek(consumed_samples)


def build_datasets(data_cfg, seq_length: int, seed: int, *, image_tokens: int | None = None):
    """(train, valid, vocab_size) for `data_cfg` (any object with the DataConfig fields).

    markov: two MarkovCorpus splits (train: 1,000,000 virtual samples, each made on demand;
    valid: 4096); `seed` is unused, the chain and its samples follow `markov_seed`.
    indexed: two GPTSequenceDataset splits of `path`, shuffled with `seed`.
    shapes: the two splits of the shapes image set (megamoe.data.shapes); the third value is
    then the number of classes, the size of what the model predicts.
    scenes: the two splits of the scenes image+text set (megamoe.data.scenes; train: 1,000,000
    virtual samples, valid: 4096) with `image_tokens` <image> placeholders per sample (the
    model's count); the third value is the closed word vocabulary's size.
    clips: the two splits of the clips video+text set (megamoe.data.clips), likewise.
    sounds: the two splits of the sounds audio+text set (megamoe.data.sounds), as scenes.
    energon: the train and val splits of the prepared dataset at `path`, streamed per DP rank
    (megamoe.data.energon_source), tokenised with the scenes vocabulary (the third value).
    """
    if data_cfg.kind == "markov":
        from megamoe.data.markov import MarkovCorpus

        common = dict(vocab_size=data_cfg.markov_vocab_size, branching=data_cfg.markov_branching,
                      seed=data_cfg.markov_seed, seq_length=seq_length)
        train = MarkovCorpus(num_samples=1_000_000, split="train", **common)
        valid = MarkovCorpus(num_samples=4096, split="valid", **common)
        return train, valid, data_cfg.markov_vocab_size
    if data_cfg.kind == "indexed":
        from megamoe.data.gpt_dataset import build_indexed_datasets

        if not data_cfg.path:
            raise ValueError("data.path: required when data.kind is 'indexed'")
        return build_indexed_datasets(data_cfg, seq_length, seed)
    if data_cfg.kind == "shapes":
        from megamoe.data.shapes import build_shapes_datasets

        return build_shapes_datasets(data_cfg.shapes_seed, data_cfg.image_size,
                                     data_cfg.num_classes)
    if data_cfg.kind == "scenes":
        from megamoe.data.scenes import build_scenes_datasets

        if image_tokens is None:
            raise ValueError("data.kind: 'scenes' needs the model's image token count "
                             "(build_datasets(..., image_tokens=...); a vlm model gives it)")
        return build_scenes_datasets(data_cfg, image_tokens, seq_length)
    if data_cfg.kind == "sounds":
        from megamoe.data.sounds import build_sounds_datasets

        if image_tokens is None:
            raise ValueError("data.kind: 'sounds' needs the model's spectrogram token count "
                             "(build_datasets(..., image_tokens=...); a vlm model gives it)")
        return build_sounds_datasets(data_cfg, image_tokens, seq_length)
    if data_cfg.kind == "clips":
        from megamoe.data.clips import build_clips_datasets

        if image_tokens is None:
            raise ValueError("data.kind: 'clips' needs the model's clip token count "
                             "(build_datasets(..., image_tokens=...); a vlm model gives it)")
        return build_clips_datasets(data_cfg, image_tokens, seq_length)
    if data_cfg.kind == "energon":
        from megamoe.data.energon_source import build_energon_sources

        if image_tokens is None:
            raise ValueError("data.kind: 'energon' needs the model's image token count (a vlm "
                             "model gives it)")
        return build_energon_sources(data_cfg, image_tokens, seq_length, seed)
    raise ValueError(f"data.kind: unknown kind {data_cfg.kind!r} (markov, indexed, shapes, "
                     "scenes, sounds, clips or energon)")
