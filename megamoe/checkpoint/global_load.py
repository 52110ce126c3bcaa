"""Global tensor dicts (`megamoe.models.global_view.gather_global`'s format) into a model of any
layout, and the two layer layouts such a dict can have.

Megatron names a decoder layer's tensors either per layer (`decoder.layers.<i>.<name>`, when MoE
and dense layers alternate) or stacked along a leading layer axis (`decoder.layers.<name>`, when
all layers have the same kind). `load_global_into` accepts either, so a dict converted from
Hugging Face initialises a model under any TP/EP/PP layout: each rank copies its own slice, as
`parameter_shards` describes it.
"""

from __future__ import annotations

import torch

from megamoe.models.vocab import VOCAB_KEYS, pad_rows, unpadded_vocab_size

LAYER_PREFIX = "decoder.layers."


def _layer_index(key: str) -> tuple[int | None, str]:
    """(i, name) for a per-layer key `decoder.layers.<i>.<name>`, (None, name) for a stacked one."""
    head, _, tail = key[len(LAYER_PREFIX):].partition(".")
    return (int(head), tail) if head.isdigit() else (None, key[len(LAYER_PREFIX):])


def unstack_layers(tensors: dict) -> dict:
    """The same tensors with every stacked layer key split into per-layer keys."""
    out = {}
    for key, t in tensors.items():
        if not key.startswith(LAYER_PREFIX):
            out[key] = t
            continue
        i, name = _layer_index(key)
        if i is not None:
            out[key] = t
        else:
            for j in range(t.shape[0]):
                out[f"{LAYER_PREFIX}{j}.{name}"] = t[j]
    return out


def stack_layers(tensors: dict) -> dict:
    """Per-layer keys stacked along a leading layer axis (every layer must hold the same names)."""
    flat = unstack_layers(tensors)
    out, layers = {}, {}
    for key, t in flat.items():
        if key.startswith(LAYER_PREFIX):
            i, name = _layer_index(key)
            layers.setdefault(name, {})[i] = t
        else:
            out[key] = t
    for name, by_layer in layers.items():
        assert sorted(by_layer) == list(range(len(by_layer))), (name, sorted(by_layer))
        out[LAYER_PREFIX + name] = torch.stack([by_layer[i] for i in range(len(by_layer))])
    return out


def num_layers(tensors: dict) -> int:
    """How many decoder layers the dict holds (either layout)."""
    found = {_layer_index(k)[0] for k in unstack_layers(tensors) if k.startswith(LAYER_PREFIX)}
    return len(found)


def _source(flat: dict, sh, vocab: int | None) -> tuple[torch.Tensor, tuple, tuple, int]:
    """The global tensor that holds shard `sh`, its offset, shape and prepended axes in it
    (vocabulary tensors of `vocab` rows padded as the model is)."""
    offset, shape, p = tuple(sh.global_offset), tuple(sh.global_shape), sh.prepend_axis_num
    key = sh.key
    if key.startswith(LAYER_PREFIX) and _layer_index(key)[0] is None:
        assert p >= 1, key                     # stacked: the first prepended axis is the layer
        key = f"{LAYER_PREFIX}{offset[0]}.{_layer_index(key)[1]}"
        offset, shape, p = offset[1:], shape[1:], p - 1
    if key not in flat:
        raise ValueError(f"global tensors: no {key!r} (the model has this parameter)")
    src = flat[key]
    if key in VOCAB_KEYS and src.shape[0] == vocab and tuple(src.shape[1:]) == shape[1:]:
        src = pad_rows(src, shape[0])      # the unpadded vocabulary into the padded rows
    if tuple(src.shape) != shape:
        raise ValueError(f"global tensors: {key!r} has shape {tuple(src.shape)}, the model "
                         f"expects {shape}")
    return src, offset, shape, p


@torch.no_grad()
def load_global_into(chunks, tensors: dict) -> int:
    """Copy `tensors` (global key → full tensor, either layer layout) into every parameter of
    `chunks` (this rank's model chunks, any parallel layout); returns the local elements written."""
    from megamoe.models.global_view import parameter_shards

    flat, vocab = unstack_layers(tensors), unpadded_vocab_size(chunks)
    written = 0
    for sh in parameter_shards(chunks):
        src, offset, _, p = _source(flat, sh, vocab)
        local = (1,) * p + tuple(sh.local_shape)
        index = tuple(slice(o, o + n) for o, n in zip(offset, local))
        sh.data.copy_(src[index].reshape(sh.data.shape).to(sh.data.dtype))
        written += sh.data.numel()
    return written
