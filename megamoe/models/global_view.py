"""The model as global tensors: every local parameter (or its gradient) addressed by its global
checkpoint key, shape and offset, as Megatron's `sharded_state_dict` describes it.

Used by initialisation (a function of the global tensor), by parity tests (gather the whole
model or gradient on every rank and compare with one process) and by checkpoint inspection.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megatron.core.dist_checkpointing.mapping import (
    ShardedTensor,
    ShardedTensorFactory,
    is_main_replica,
)

from megamoe.models.vocab import VOCAB_KEYS, unpadded_rows, unpadded_vocab_size


def _leaves(sharded_sd):
    for value in sharded_sd.values():
        if isinstance(value, dict):
            yield from _leaves(value)
        elif isinstance(value, list):
            yield from _leaves(dict(enumerate(value)))
        elif isinstance(value, ShardedTensorFactory):
            built = value.build()
            yield from _leaves({"_": built})
        elif isinstance(value, ShardedTensor):
            yield value


def parameter_shards(chunks):
    """Yield the ShardedTensors of `chunks` whose data is (a view of) a parameter."""
    storages = {p.untyped_storage().data_ptr() for c in chunks for p in c.parameters()}
    for chunk in chunks:
        for sh in _leaves(chunk.sharded_state_dict()):
            if sh.data is None or not sh.data.is_floating_point():
                continue
            if sh.data.untyped_storage().data_ptr() in storages:
                yield sh


@contextlib.contextmanager
def grads_as_data(chunks):
    """Temporarily point each parameter's `.data` at its gradient (main_grad under Megatron
    DDP), so `sharded_state_dict` describes gradients with the parameters' global layout."""
    saved = []
    for c in chunks:
        for p in c.parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is None:
                g = torch.zeros_like(p.data)
            saved.append((p, p.data))
            p.data = g.to(p.dtype).view_as(p.data)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


def local_pieces(chunks) -> list:
    """(key, global_shape, global_offset, local tensor) of this rank's main replicas; vocabulary
    tensors without their padding rows (megamoe.models.vocab)."""
    vocab = unpadded_vocab_size(chunks)
    pieces = []
    for sh in parameter_shards(chunks):
        if not is_main_replica(sh.replica_id):
            continue
        p = sh.prepend_axis_num
        local_shape = (1,) * p + tuple(sh.local_shape)
        local = sh.data.detach().float().cpu().reshape(local_shape)
        global_shape = tuple(sh.global_shape)
        if sh.key in VOCAB_KEYS and vocab is not None:
            assert p == 0, sh.key
            rows = unpadded_rows(sh.key, sh.global_offset, local.shape[0], vocab)
            if rows == 0:
                continue
            local, global_shape = local[:rows], (vocab, *global_shape[1:])
        pieces.append((sh.key, global_shape, tuple(sh.global_offset), local.clone()))
    return pieces


def gather_global(chunks, grads: bool = False, group=None) -> dict:
    """Every global parameter (or gradient) as a full CPU fp32 tensor, on every rank."""
    ctx = grads_as_data(chunks) if grads else contextlib.nullcontext()
    with ctx:
        mine = local_pieces(chunks)
    everyone = [mine]
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        everyone = [None] * dist.get_world_size(group)
        dist.all_gather_object(everyone, mine, group=group)
    full: dict = {}
    for pieces in everyone:
        for key, shape, offset, tensor in pieces:
            dst = full.setdefault(key, torch.zeros(shape))
            index = tuple(slice(o, o + n) for o, n in zip(offset, tensor.shape))
            dst[index] = tensor
    return full
