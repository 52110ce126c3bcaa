"""Routing context: what a router may look at besides the hidden states.

Megatron's `MoELayer.route()` hands routers only hidden states and a padding mask. Paper routers
also need modality ids (VLMo, Uni-MoE, LIMoE), diffusion timesteps (Diff-MoE, DiT-MoE) and
sequence boundaries. The context is built from the micro-batch on every pipeline stage (never sent
point-to-point) and sharded exactly like the hidden states under sequence parallelism.

Shapes: B batch, S sequence, T = S·B tokens in Megatron's [S, B] order, D timestep embedding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class RoutingContext:
    modality_ids_BS: Optional[torch.Tensor] = None   # int, [B, S]
    timestep_emb_BD: Optional[torch.Tensor] = None   # float, [B, D]
    sequence_ids_BS: Optional[torch.Tensor] = None   # int, [B, S]: document index inside a sample
    labels_BS: Optional[torch.Tensor] = None         # int, [B, S]: the training target (next token)
    extras: dict = field(default_factory=dict)

    def require(self, name: str, who: str) -> torch.Tensor:
        value = getattr(self, name, None)
        if value is None:
            raise ValueError(
                f"{who} needs routing context '{name}', but the model's batches do not provide it"
            )
        return value

    def tokens(self, name: str, sp_rank: int = 0, sp_size: int = 1) -> torch.Tensor:
        """A per-token field as [T] in Megatron's [S, B] flattening, restricted to this rank's
        slice of the sequence under sequence parallelism."""
        value_BS = getattr(self, name)
        value_SB = value_BS.transpose(0, 1)
        s_local = value_SB.shape[0] // sp_size
        return value_SB[sp_rank * s_local:(sp_rank + 1) * s_local].reshape(-1)


PER_TOKEN_FIELDS = ("modality_ids_BS", "sequence_ids_BS", "labels_BS")


def compacted(context: RoutingContext, index_BK: torch.Tensor) -> RoutingContext:
    """The context of a compacted batch (Mixture-of-Recursions: the tokens a recursion step
    keeps, megamoe.mor.compaction): per-token fields gathered at the positions `index_BK`
    [B, K] (pads hold position 0: their value is a real token's, and routers that take the
    padding mask ignore it); per-sample fields and `extras` unchanged."""
    per_token = {}
    for name in PER_TOKEN_FIELDS:
        value_BS = getattr(context, name)
        if value_BS is not None:
            per_token[name] = torch.gather(value_BS, 1, index_BK.to(value_BS.device))
    return dataclasses.replace(context, **per_token)


class RoutingContextSlot:
    """Holds the current micro-batch's context; one per model, shared by all its MoE layers."""

    def __init__(self):
        self.current = RoutingContext()

    def set(self, context: RoutingContext) -> None:
        self.current = context

    def get(self) -> RoutingContext:
        return self.current
