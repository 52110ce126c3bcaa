"""Soft MoE layer (Puigcerver et al. 2023, Eq. 1-3; papers.md §13c) on Megatron's dispatcher.

The slots, not the tokens, go to the experts: X̃ = Dᵀ X (n·p slot inputs per micro-batch) are
routed deterministically (slot s → expert s // p, weight 1) through Megatron's all-to-all
dispatcher, SequentialMLP experts and combine, then each token takes Y = C Ỹ. Experts are
sharded by EP like any other family.

Under TP with sequence parallelism each rank holds S/TP of the sequence, while the slots mix the
whole micro-batch: the hidden states are all-gathered over the TP group (backward:
reduce-scatter), every TP rank computes D and C for the micro-batch, sends only its 1/TP share
of the slots to the experts, and all-gathers the slot outputs Ỹ again before Y = C Ỹ on its own
tokens. The slot parameters' gradients are then partial per TP rank and summed by Megatron's
finalize step (they are marked `sequence_parallel`).

Shapes: S_l local sequence, B batch, D hidden, T = S_l·B local tokens, M micro-batch tokens,
N slots, N_r this TP rank's slots.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megamoe.moe.layer import MegamoeMoELayer


class SoftMoELayer(MegamoeMoELayer):
    def moe_forward(self, hidden_states: torch.Tensor,
                    padding_mask: Optional[torch.Tensor] = None):
        if padding_mask is not None:
            raise NotImplementedError("Soft MoE slots mix every token: padding is not supported")
        S_l, B, D = hidden_states.shape
        tp, tp_rank = self.tp_group.size(), self.tp_group.rank()
        assert tp == 1 or self.config.sequence_parallel, "MoE with TP needs sequence parallelism"
        shared_SBD = self.shared_experts_compute(hidden_states)

        x_TD = hidden_states.reshape(-1, D)
        x_MD = gather_from_sequence_parallel_region(x_TD, group=self.tp_group) if tp > 1 else x_TD
        T, N = x_TD.shape[0], self.router.num_slots
        if N % tp:
            raise ValueError(f"model.moe.soft.slots_per_expert: {N} slots are not divisible "
                             f"by parallel.tensor ({tp})")
        n_r = N // tp
        slots_ND, combine_TN, stats = self.router.slots(
            x_MD, rows=slice(tp_rank * T, (tp_rank + 1) * T),
            slot_rows=slice(tp_rank * n_r, (tp_rank + 1) * n_r))

        # this rank's slots through Megatron's route → dispatch → experts → combine
        probs, routing_map = self.route(slots_ND, slot_offset=tp_rank * n_r, stats=stats)
        tokens, probs = self.preprocess(slots_ND, probs, routing_map)
        tokens, probs = self.dispatch(tokens, probs)
        out, _ = self.routed_experts_compute(tokens, probs)
        out = self.combine(out)
        slot_out_ND = self.token_dispatcher.combine_postprocess(out)
        if tp > 1:
            slot_out_ND = gather_from_sequence_parallel_region(slot_out_ND, group=self.tp_group)

        y_TD = (combine_TN @ slot_out_ND.float()).to(hidden_states.dtype)   # Y = C Ỹ
        y_SBD = y_TD.view(S_l, B, D)
        if shared_SBD is not None:
            y_SBD = y_SBD + shared_SBD
        return y_SBD, None
