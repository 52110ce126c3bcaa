"""megamoe's router interface.

A router maps hidden states (and the routing context) to a `RouterOutput`. Unlike Megatron's
`RouterInterface` it also reports auxiliary losses, statistics, whether it is causal, and over
which group of tokens it selects, so the layer can log them, the model can refuse non-causal
routers in a causal decoder, and parity tests can mirror the selection group.

Shapes: T tokens (S·B, Megatron order), E experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from megamoe.moe.routing_context import RoutingContext

TOKEN_GROUPS = ("token", "sequence", "micro-batch", "data-parallel")


@dataclass
class RouterOutput:
    probs_TE: torch.Tensor          # float; weight of expert e for token t (0 where not routed)
    routing_map_TE: torch.Tensor    # bool; a token may go to any number of experts, or none
    aux_losses: dict = field(default_factory=dict)   # name -> detached value, for logging
    tokens_per_expert_E: torch.Tensor | None = None  # local routed-token counts


class MegamoeRouter:
    """Mixin that every megamoe router implements (next to a torch.nn.Module base)."""

    causal: ClassVar[bool] = True
    token_group: ClassVar[str] = "token"
    needs_context: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""

    def route(self, hidden_SBD: torch.Tensor, context: RoutingContext) -> RouterOutput:
        raise NotImplementedError

    def is_causal(self) -> bool:
        return self.causal

    @classmethod
    def causal_for(cls, moe_cfg) -> bool:
        """Whether this family is causal under `moe_cfg` (checked before any rank starts)."""
        return cls.causal
