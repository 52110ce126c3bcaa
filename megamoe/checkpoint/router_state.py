"""Router buffers as global tensors, next to `gather_global`'s parameters.

Some routers hold model state in persistent buffers rather than parameters: the loss-free
`selection_bias` (topk, dit_moe, diff_moe), Expert Race's `threshold_ema` / `threshold_updates`,
V-MoE's `noise_step`, and the Mixture-of-Recursions token-choice depth router's loss-free
`router_bias`. `gather_global` describes parameters only, so exports add these under their
checkpoint keys (fp32): `decoder.layers.<i>.mlp.router.<name>`; in a MoR decoder
`decoder.layers.{0,1}.mlp.router.<name>` (unique layers), `decoder.recursion.layers.<j>.mlp.
router.<name>` (the shared pool) and `decoder.recursion.router.<name>`; an encoder's MoE layers
(another stream, megamoe.moe.layer: their layer numbers repeat the LM's) under their own module
path, e.g. `vision.decoder.layers.<i>.mlp.router.<name>` (a tower sits whole on one stage, so
its path is its global key); imports copy them back.
Non-persistent buffers (per-step counters, masks computed from the config) are not model state
and stay out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.checkpoint.global_load import LAYER_PREFIX, unstack_layers


def _persistent(module, prefix: str):
    buffers = dict(module.named_buffers())
    for name in module.state_dict():
        if name in buffers:
            yield prefix + name, buffers[name]


def _router_buffers(chunks):
    """(global key, buffer) of every persistent router buffer this rank holds."""
    from megamoe.models.lm.model import moe_layers
    from megamoe.mor.decoder import MoRDecoder

    # a MoR layer's number is its pool slot + 1: key it by its checkpoint name (the unique
    # layers' global keys also on a pipeline stage that holds only the last one)
    mor_prefix = {}
    for decoder in (m for c in chunks for m in c.modules() if isinstance(m, MoRDecoder)):
        for key, layer in zip(decoder.layer_keys, decoder.layers):
            mor_prefix[id(layer.mlp)] = f"{LAYER_PREFIX}{key}.mlp.router."
        if decoder.recursion is not None:
            for j, layer in enumerate(decoder.recursion.layers):
                mor_prefix[id(layer.mlp)] = f"decoder.recursion.layers.{j}.mlp.router."
            yield from _persistent(decoder.recursion.router, "decoder.recursion.router.")
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if getattr(module, "stream", ""):
                mor_prefix[id(module)] = f"{name}.router."
    for layer in moe_layers(chunks):
        prefix = mor_prefix.get(id(layer), f"{LAYER_PREFIX}{layer.layer_number - 1}.mlp.router.")
        yield from _persistent(layer.router, prefix)


def gather_router_buffers(chunks, group=None) -> dict:
    """Global key → fp32 CPU copy, merged over the ranks (pipeline stages hold other layers;
    routers are replicated across TP/EP/DP)."""
    mine = {key: buf.detach().float().cpu().clone() for key, buf in _router_buffers(chunks)}
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return mine
    everyone = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    return {k: v for part in everyone for k, v in part.items()}


@torch.no_grad()
def load_router_buffers(chunks, tensors: dict) -> int:
    """Copy the router buffers held in `tensors` (either layer layout) into this rank's routers;
    returns how many were written. A buffer the model has but `tensors` lacks is an error."""
    flat = unstack_layers(tensors)
    written = 0
    for key, buf in _router_buffers(chunks):
        if key not in flat:
            raise ValueError(f"global tensors: no {key!r} (the model has this router buffer)")
        src = flat[key]
        if tuple(src.shape) != tuple(buf.shape):
            raise ValueError(f"global tensors: {key!r} has shape {tuple(src.shape)}, the model "
                             f"expects {tuple(buf.shape)}")
        buf.copy_(src.to(buf.dtype))
        written += 1
    return written
