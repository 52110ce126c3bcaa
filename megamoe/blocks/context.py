"""The model's context: what routers and norms may look at besides the hidden states.

Megatron's `MoELayer.route()` hands routers only hidden states and a padding mask. Paper routers
and norms also need modality ids (VLMo, Uni-MoE, LIMoE, CogVideoX expert AdaLN), diffusion
timesteps and class labels (DiT adaLN-Zero, Diff-MoE), sample identity (V-MoE's noise and Batch
Prioritized Routing) and sequence boundaries. A `Context` is built by the family's task from the
micro-batch on every pipeline stage (never sent point to point), one per micro-batch and per token
stream, and is sharded exactly like the hidden states under sequence parallelism (`tokens`).

Binding: the model's forward binds its context (`bind`) for the duration of the call and its
layers read it with `current_context()`; a nested `bind` (the MoR recursion block's compact
batch) shadows the outer one until it exits. Nothing holds a context between calls, so two
interleaved micro-batches (pipeline schedules) or two token streams cannot see each other's.
Activation recompute re-runs layer forwards in backward, after the model's scope has ended:
the checkpointed function re-binds the context it captured (megamoe.blocks.recompute).

Shapes: B batch, S sequence, T = S·B tokens in Megatron's [S, B] order, D embedding width.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

PER_TOKEN_FIELDS = ("modality_ids_BS", "sequence_ids_BS", "labels_BS", "padding_mask_BS",
                    "targets_BSP")


@dataclass
class Context:
    sample_index_B: Optional[torch.Tensor] = None    # int64 [B]: global dataset position
    modality_ids_BS: Optional[torch.Tensor] = None   # int [B, S]
    timestep_emb_BD: Optional[torch.Tensor] = None   # float [B, D]
    class_labels_B: Optional[torch.Tensor] = None    # int [B] (class-conditional families)
    sequence_ids_BS: Optional[torch.Tensor] = None   # int [B, S]: document index inside a sample
    labels_BS: Optional[torch.Tensor] = None         # int [B, S]: the training target
    padding_mask_BS: Optional[torch.Tensor] = None   # bool [B, S], True = pad
    targets_BSP: Optional[torch.Tensor] = None       # float [B, S, P]: a per-token regression
    #                                                  target (a DiT's patchified v or ε)
    step: Optional[int] = None                        # optimizer steps taken before this batch
    extras: dict = field(default_factory=dict)

    def require(self, name: str, who: str) -> torch.Tensor:
        value = getattr(self, name, None)
        if value is None:
            raise ValueError(
                f"{who} needs routing context '{name}', but the model's batches do not "
                "provide it")
        return value

    def tokens(self, name: str, sp_rank: int = 0, sp_size: int = 1) -> torch.Tensor:
        """A per-token field as [T] (or [T, P] for a vector per token) in Megatron's [S, B]
        flattening, restricted to this rank's slice of the sequence under sequence
        parallelism."""
        value_SB = getattr(self, name).transpose(0, 1)
        s_local = value_SB.shape[0] // sp_size
        local = value_SB[sp_rank * s_local:(sp_rank + 1) * s_local]
        return local.reshape(-1, *value_SB.shape[2:])

    def compacted(self, index_BK: torch.Tensor) -> "Context":
        """The context of a compacted batch (Mixture-of-Recursions: the tokens a recursion step
        keeps, megamoe.mor.compaction): per-token fields gathered at the positions `index_BK`
        [B, K] (pads hold position 0: their value is a real token's, and routers that take the
        padding mask ignore it); per-sample fields and `extras` unchanged."""
        per_token = {}
        for name in PER_TOKEN_FIELDS:
            value_BS = getattr(self, name)
            if value_BS is not None:
                index = index_BK.to(value_BS.device)
                index = index.view(*index.shape, *[1] * (value_BS.dim() - 2))
                per_token[name] = torch.gather(value_BS, 1,
                                               index.expand(*index_BK.shape, *value_BS.shape[2:]))
        return dataclasses.replace(self, **per_token)


_BOUND: contextvars.ContextVar[Optional[Context]] = contextvars.ContextVar("megamoe_context",
                                                                         default=None)


@contextlib.contextmanager
def bind(context: Optional[Context]) -> Iterator[Optional[Context]]:
    """Make `context` the current one until the block exits (then the outer one is again).
    None binds "no context" (layers read an empty one)."""
    token = _BOUND.set(context)
    try:
        yield context
    finally:
        _BOUND.reset(token)


def bound_context() -> Optional[Context]:
    """The innermost bound context, None outside every `bind` (or inside `bind(None)`)."""
    return _BOUND.get()


def current_context() -> Context:
    """What layers read: the innermost bound context, an empty one when none is bound (a
    forward without context: families that need a field raise when they `require` it)."""
    context = _BOUND.get()
    return Context() if context is None else context
