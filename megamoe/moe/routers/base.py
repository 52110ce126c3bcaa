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

from megamoe.blocks.context import Context


@dataclass
class RouterOutput:
    probs_TE: torch.Tensor          # float; weight of expert e for token t (0 where not routed)
    routing_map_TE: torch.Tensor    # bool; a token may go to any number of experts, or none
    aux_losses: dict = field(default_factory=dict)   # name -> detached value, for logging
    tokens_per_expert_E: torch.Tensor | None = None  # local routed-token counts
    stats: dict = field(default_factory=dict)         # name -> float, see routing_stats


class MegamoeRouter:
    """Mixin that every megamoe router implements (next to a torch.nn.Module base)."""

    causal: ClassVar[bool] = True
    # over which tokens the family selects (`token_groups.SELECTION_GROUPS`), default first;
    # with more than one, `selection_option` names the config key that picks the group, or
    # (empty) `selection_group_for` derives it from other options (e.g. a capacity)
    selection_groups: ClassVar[tuple[str, ...]] = ("token",)
    selection_option: ClassVar[str] = ""
    needs_context: ClassVar[tuple[str, ...]] = ()
    paper: ClassVar[str] = ""
    # whether `route` takes `padding_mask` (bool [S, B], True = pad) and leaves pads out of
    # routing and every loss and statistic; the MoE layer refuses a mask for other families
    takes_padding_mask: ClassVar[bool] = False
    # the MoE stack its layer belongs to (megamoe.moe.layer.mark_stream): "" the model's main one
    stream: str = ""

    def tracker_name(self, name: str) -> str:
        """`name` in Megatron's aux-loss tracker, which keys losses by layer number alone: an
        encoder's layers log under "<stream>/<name>" so they do not add into the LM's."""
        return f"{self.stream}/{name}" if self.stream else name

    def route(self, hidden_SBD: torch.Tensor, context: Context) -> RouterOutput:
        raise NotImplementedError

    def is_causal(self) -> bool:
        return self.causal

    def after_step(self) -> None:
        """Called once after every optimizer step (buffers updated per step, e.g. biases)."""

    @classmethod
    def options_from(cls, moe_cfg) -> dict:
        """Keyword arguments for the constructor taken from `model.moe` (family options)."""
        return {}

    @classmethod
    def extra_parameters(cls, moe_cfg, hidden: int, vocab_size: int) -> tuple[int, int]:
        """(total, active per token) parameters of one MoE layer's router beyond Megatron's
        [E, D] gate, which `specs.accounting.layer_parameters` counts (may be negative)."""
        return 0, 0

    @classmethod
    def selection_group_for(cls, moe_cfg) -> str:
        """The group this family selects over under `moe_cfg` (one of `selection_groups`):
        the value of its `selection_option` (`model.moe.<section>.<field>`), else its default."""
        if not cls.selection_option:
            return cls.selection_groups[0]
        section, name = cls.selection_option.removeprefix("model.moe.").split(".")
        return getattr(getattr(moe_cfg, section), name)

    @classmethod
    def causal_for(cls, moe_cfg) -> bool:
        """Whether this family is causal under `moe_cfg` (checked before any rank starts)."""
        return cls.causal


@torch.no_grad()
def routing_stats(scores_TE: torch.Tensor, routing_map_TE: torch.Tensor, k: float) -> dict:
    """Statistics every family reports: fraction of the k·T wanted assignments that were not
    made (dropped), mean router entropy −Σ p log p of the normalised scores, and the mean
    number of experts per token."""
    T = max(routing_map_TE.shape[0], 1)
    p_TE = scores_TE.float() / scores_TE.float().sum(dim=-1, keepdim=True).clamp_min(1e-20)
    entropy = -(p_TE * p_TE.clamp_min(1e-20).log()).sum(dim=-1).mean()
    assigned = routing_map_TE.sum().item()
    return {"dropped_fraction": max(0.0, 1.0 - assigned / (k * T)),
            "router_entropy": entropy.item(),
            "experts_per_token": assigned / T}
