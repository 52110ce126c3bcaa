"""Parameter initialisation as a function of the *global* parameter, never of the rank.

Every parameter is read through Megatron's `sharded_state_dict`, which names the global tensor
(`key`, with global layer and expert indices), its global shape and this rank's offset. The
global values are drawn from a generator seeded by (seed, key, prepended-axis index), and each
rank copies in its own slice, so any TP/EP/PP layout holds the same model as one process.
"""

from __future__ import annotations

import math
import zlib

import torch

from megamoe.models.global_view import parameter_shards
from megamoe.models.vocab import VOCAB_KEYS, pad_rows, unpadded_vocab_size


def _std_for(key: str, std: float, num_layers: int, shape=()) -> float | None:
    """None means 'ones' (norm weights); 0 means zeros (biases). `shape`: the global shape."""
    name = key.rsplit(".", 1)[-1]
    if ".recursion.lora." in key:  # RRT adapters (mor/lora.py): B = 0, A ~ N(0, 1/d_in)
        return 0.0 if name.startswith("B") else 1.0 / math.sqrt(shape[-1])
    if "adaln_zero" in key:        # adaLN-Zero: a modulation's last layer starts at 0 (DiT)
        return 0.0
    if "norm" in key and name == "weight":
        return None
    if name == "bias" or name.startswith("bias"):
        return 0.0
    if name.endswith("_offset"):   # a learned offset from a configured start (models/contrastive)
        return 0.0
    if "linear_proj" in key or "linear_fc2" in key:
        return std / math.sqrt(2.0 * num_layers)   # GPT-2 / Megatron scaled output init
    return std


def _global_values(key: str, prepend_index: tuple, shape, std, seed: int) -> torch.Tensor:
    if std is None:
        return torch.ones(shape)
    if std == 0.0:
        return torch.zeros(shape)
    tag = f"{key}|{prepend_index}".encode()
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(tag)) % (2**63))
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_global(chunks, seed: int, std: float, num_layers: int) -> int:
    """Fill every parameter of `chunks`; returns how many local elements were written.
    Vocabulary tensors: the unpadded model's rows, then zeros (megamoe.models.vocab)."""
    written, vocab = 0, unpadded_vocab_size(chunks)
    for sh in parameter_shards(chunks):
        p = sh.prepend_axis_num
        prepend_index = tuple(sh.global_offset[:p])
        shape = tuple(sh.global_shape[p:])
        padded = sh.key in VOCAB_KEYS and vocab is not None
        if padded:
            shape = (vocab, *shape[1:])
        values = _global_values(sh.key, prepend_index, shape,
                                _std_for(sh.key, std, num_layers, shape), seed)
        if padded:
            values = pad_rows(values, sh.global_shape[p])
        index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[p:], sh.local_shape))
        sh.data.copy_(values[index].reshape(sh.data.shape).to(sh.data.dtype))
        written += sh.data.numel()
    return written
