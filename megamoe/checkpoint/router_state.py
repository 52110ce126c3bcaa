"""Router buffers as global tensors, next to `gather_global`'s parameters.

Some routers hold model state in persistent buffers rather than parameters: the loss-free
`selection_bias` (topk, dit_moe, diff_moe), Expert Race's `threshold_ema` / `threshold_updates`,
V-MoE's `noise_step`. `gather_global` describes parameters only, so exports add these under
`decoder.layers.<i>.mlp.router.<name>` (fp32), and imports copy them back. Non-persistent
buffers (per-step counters, masks computed from the config) are not model state and stay out.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.checkpoint.global_load import LAYER_PREFIX, unstack_layers


def _router_buffers(chunks):
    """(global key, buffer) of every persistent router buffer this rank holds."""
    from megamoe.models.lm import moe_layers

    for layer in moe_layers(chunks):
        buffers = dict(layer.router.named_buffers())
        for name in layer.router.state_dict():
            if name in buffers:
                yield f"{LAYER_PREFIX}{layer.layer_number - 1}.mlp.router.{name}", buffers[name]


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
