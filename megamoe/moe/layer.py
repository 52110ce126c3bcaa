"""megamoe's MoE layer: route (with routing context) → dispatch → experts → combine.

Dispatch, experts and combine are Megatron-Core's (`MoELayer`, all-to-all or all-gather token
dispatcher, `SequentialMLP`/`GroupedMLP`); only routing goes through megamoe's router interface
so that routers can read the routing context and report statistics.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.transformer.moe.moe_layer import MoELayer

from megamoe.moe.routing_context import RoutingContextSlot


class MegamoeMoELayer(MoELayer):
    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 context_slot: Optional[RoutingContextSlot] = None):
        super().__init__(config, submodules, layer_number, pg_collection)
        self.context_slot = context_slot or RoutingContextSlot()
        self.last_tokens_per_expert = None   # [E] local counts of the last forward
        self.register_buffer("tokens_per_expert_acc", torch.zeros(config.num_moe_experts),
                             persistent=False)
        self.stats_acc: dict = {}            # name -> [sum, count] since the last read

    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """`padding_mask`: bool [S, B] (Megatron's `MoELayer.forward` transposes the layer's
        [B, S]), True = pad; only families with `takes_padding_mask` accept one."""
        context = self.context_slot.get()
        if padding_mask is None:
            out = self.router.route(hidden_states, context)
        elif self.router.takes_padding_mask:
            out = self.router.route(hidden_states, context, padding_mask=padding_mask)
        else:
            raise ValueError(f"model.moe.router: {type(self.router).__name__} does not take a "
                             "padding mask (pads would count in its routing and losses)")
        if out.tokens_per_expert_E is not None:
            self.last_tokens_per_expert = out.tokens_per_expert_E
            self.tokens_per_expert_acc += out.tokens_per_expert_E.to(self.tokens_per_expert_acc)
        if self.training:
            for name, value in out.stats.items():
                acc = self.stats_acc.setdefault(name, [0.0, 0])
                acc[0], acc[1] = acc[0] + float(value), acc[1] + 1
        return out.probs_TE, out.routing_map_TE
