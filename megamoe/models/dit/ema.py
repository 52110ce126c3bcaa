"""An exponential moving average of a chunk's parameters (DiT trains with EMA 0.9999 and samples
with the EMA weights): θ_ema ← d·θ_ema + (1 − d)·θ after every optimizer step.

Storage. `EMAShadow` is a child module holding one persistent fp32 buffer per parameter of its
chunk (name: the parameter's, dots as `__`), so `state_dict`/`load_state_dict` carry it. Its
sharded form is not Megatron's default (which would save each rank's local buffer as a whole
replicated tensor): `with_ema_entries` adds, next to each parameter's ShardedTensor, one with
key `ema.<key>` and the same global shape, offset and replica id, so the EMA saves and reshards
across TP/EP/PP/DP exactly like the weights it averages.

Use. `ema_weights(chunks)` swaps the EMA into the parameters for the duration of a block
(sampling, evaluation) and restores the trained weights after it.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory


def _buffer_name(param_name: str) -> str:
    return param_name.replace(".", "__")


class EMAShadow(torch.nn.Module):
    """The EMA buffers (decay d) of the module `owner` (its parameters at construction; every
    parameter of a chunk exists by then). The owner is not a submodule (no cycle)."""

    def __init__(self, owner: torch.nn.Module, decay: float):
        super().__init__()
        self.decay = decay
        self._names = [n for n, _ in owner.named_parameters()]
        self._owner = [owner]                     # a list: not registered as a child
        for name, p in owner.named_parameters():
            self.register_buffer(_buffer_name(name), torch.zeros(p.shape, dtype=torch.float32))

    def pairs(self):
        """(parameter, its EMA buffer) of the owner."""
        params = dict(self._owner[0].named_parameters())
        return [(params[n], getattr(self, _buffer_name(n))) for n in self._names]

    def buffer_for(self, param: torch.Tensor) -> torch.Tensor | None:
        for p, shadow in self.pairs():
            if p is param:
                return shadow
        return None

    @torch.no_grad()
    def reset(self) -> None:
        """θ_ema ← θ (the start of training)."""
        for p, shadow in self.pairs():
            shadow.copy_(p.detach().float())

    @torch.no_grad()
    def update(self) -> None:
        """θ_ema ← d·θ_ema + (1 − d)·θ."""
        pairs = self.pairs()
        if pairs:
            torch._foreach_lerp_([s for _, s in pairs], [p.detach().float() for p, _ in pairs],
                                 1.0 - self.decay)

    def sharded_state_dict(self, *args, **kwargs) -> dict:
        """Nothing of its own: the owner adds each buffer with its parameter's sharding."""
        return {}


def _flat(sd: dict, out: list) -> list:
    for name, value in sd.items():
        if isinstance(value, dict):
            _flat(value, out)
        else:
            out.append((name, value))
    return out


def with_ema_entries(owner: torch.nn.Module, sd: dict, prefix: str) -> dict:
    """`sd` (the owner's sharded state dict) plus a ShardedTensor per parameter for its EMA
    buffer: local name `<prefix>ema.<buffer>`, key `ema.<parameter key>`, same layout."""
    by_storage = {p.data_ptr(): (n, p) for n, p in owner.named_parameters()}
    shadow = owner.ema
    added = {}
    for name, sh in _flat(sd, []):
        assert not (isinstance(sh, ShardedTensorFactory) and sh.data.data_ptr() in by_storage), \
            f"{name}: a parameter behind a ShardedTensorFactory has no EMA entry"
        if not isinstance(sh, ShardedTensor) or sh.data is None:
            continue
        hit = by_storage.get(sh.data.data_ptr())
        if hit is None or hit[1].numel() != sh.data.numel():
            continue
        param_name, param = hit
        ema = getattr(shadow, _buffer_name(param_name))
        added[f"{prefix}ema.{_buffer_name(param_name)}"] = dataclasses.replace(
            sh, key=f"ema.{sh.key}", data=ema.view(sh.data.shape), dtype=ema.dtype)
    assert len(added) == len(shadow.pairs()), (len(added), len(shadow.pairs()))
    return {**sd, **added}


def ema_update_hook(chunks):
    """The after-step hook: every chunk's EMA one step further."""
    shadows = [getattr(c, "module", c).ema for c in chunks]

    def update():
        for shadow in shadows:
            shadow.update()

    return update


@contextlib.contextmanager
def ema_weights(chunks):
    """The chunks with their EMA weights in place of the trained ones until the block exits
    (e.g. `with ema_weights(chunks): predict(chunks, …)`)."""
    saved = []
    with torch.no_grad():
        for chunk in chunks:
            for p, shadow in getattr(chunk, "module", chunk).ema.pairs():
                saved.append((p, p.data))
                p.data = shadow.to(p.dtype).view_as(p.data).clone()
    try:
        yield chunks
    finally:
        for p, data in saved:
            p.data = data
