"""Token-choice top-k routing (Shazeer et al. 2017; Switch, Fedus et al. 2021, Eq. 4-5;
ST-MoE z-loss, Zoph et al. 2022, Eq. 5), through Megatron-Core's `TopKRouter`.

Megatron computes the scores, top-k, capacity dropping, the Switch load-balancing loss and the
z-loss, and attaches the losses to the graph; this adapter reports them and corrects one scale.
With a capacity factor, tokens compete for expert slots across the micro-batch, so the router is
not causal.

Scale under sequence parallelism with per-token loss (Megatron-Core 0.16): each TP rank holds a
partial aux / z-loss over its slice of the micro-batch, but Megatron weights it by the rank's
*local* token count (and divides the z-loss coefficient by the TP size), so the auxiliary
gradients come out TP times too small compared with one process. The parity test
`tests/distributed/test_parity.py` (TP2+SP) shows it; the overrides below weight the partial
losses by the micro-batch's token count instead.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    save_to_aux_losses_tracker,
    z_loss_func,
)
from megatron.core.transformer.moe.router import TopKRouter

from megamoe.moe.routers.base import MegamoeRouter, RouterOutput
from megamoe.moe.routing_context import RoutingContext


class TopKSoftmaxRouter(TopKRouter, MegamoeRouter):
    paper = "Switch Transformer (Fedus et al. 2021), ST-MoE z-loss (Zoph et al. 2022)"
    token_group = "micro-batch"

    def is_causal(self) -> bool:
        return self.config.moe_expert_capacity_factor is None

    @classmethod
    def causal_for(cls, moe_cfg) -> bool:
        return moe_cfg.capacity_factor is None

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss,
                                           aux_loss_name, reduce_group,
                                           reduce_group_has_dp=False, valid_token_count=None):
        if (self.calculate_per_token_loss and reduce_group is self.tp_cp_group
                and valid_token_count is not None):
            valid_token_count = valid_token_count * self.tp_cp_group.size()
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, aux_loss_name, reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)

    def apply_z_loss(self, logits, padding_mask=None):
        coeff = self.config.moe_z_loss_coeff
        if coeff is None or not (self.training and torch.is_grad_enabled()):
            return logits
        if not self.calculate_per_token_loss:
            return super().apply_z_loss(logits, padding_mask)
        # Σ_local z² · c: summed over the TP ranks this is the micro-batch's mean z² · c · N.
        z_loss = z_loss_func(logits, coeff, padding_mask=padding_mask)
        num_tokens = (~padding_mask).sum() if padding_mask is not None else logits.shape[0]
        logits = MoEAuxLossAutoScaler.apply(logits, z_loss * num_tokens)
        save_to_aux_losses_tracker("z_loss", z_loss / coeff, self.layer_number,
                                   self.config.num_layers)
        return logits

    def route(self, hidden_SBD: torch.Tensor, context: RoutingContext) -> RouterOutput:
        probs_TE, routing_map_TE = TopKRouter.forward(self, hidden_SBD)
        return RouterOutput(
            probs_TE=probs_TE,
            routing_map_TE=routing_map_TE,
            tokens_per_expert_E=routing_map_TE.sum(dim=0).detach(),
        )
