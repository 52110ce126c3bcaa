"""Soft MoE layer (Puigcerver et al. 2023, Eq. 1-3; papers.md §13c) on Megatron's dispatcher.

The slots, not the tokens, go to the experts: each sequence (sample) of the micro-batch has its
own n·p slots, X̃_b = D_bᵀ X_b, which are routed deterministically (slot s → expert s // p,
weight 1) through Megatron's all-to-all dispatcher, SequentialMLP experts and combine; then each
token takes Y = C Ỹ from its own sequence's slot outputs. Experts are sharded by EP like any
other family.

Under TP with sequence parallelism each rank holds S/TP positions of every sequence, while the
softmaxes span whole sequences: the hidden states are all-gathered over the TP group
(backward: reduce-scatter), every TP rank computes D and C for all positions, sends only its
1/TP share of every sequence's slots to the experts, and all-gathers the slot outputs Ỹ again
before Y = C Ỹ on its own positions. The slot parameters' gradients are then partial per TP
rank and summed by Megatron's finalize step (they are marked `sequence_parallel`).

Shapes: S_l local sequence, S gathered sequence, B batch, D hidden, N slots of a sequence,
N_r this TP rank's slots of a sequence.
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
            raise NotImplementedError("Soft MoE slots mix every position of a sequence: "
                                      "padding is not supported")
        S_l, B, D = hidden_states.shape
        tp, tp_rank = self.tp_group.size(), self.tp_group.rank()
        assert tp == 1 or self.config.sequence_parallel, "MoE with TP needs sequence parallelism"
        shared_SBD = self.shared_experts_compute(hidden_states)

        x_SBD = (gather_from_sequence_parallel_region(hidden_states, group=self.tp_group)
                 if tp > 1 else hidden_states)
        N = self.router.num_slots
        if N % tp:
            raise ValueError(f"model.moe.soft.slots_per_expert: {N} slots are not divisible "
                             f"by parallel.tensor ({tp})")
        n_r = N // tp
        slots_NBD, combine_SBN, stats = self.router.slots(
            x_SBD, rows=slice(tp_rank * S_l, (tp_rank + 1) * S_l),
            slot_rows=slice(tp_rank * n_r, (tp_rank + 1) * n_r))

        # this rank's slots (slot-major rows) through Megatron's route → dispatch → experts →
        # combine
        slots_RD = slots_NBD.reshape(n_r * B, D)
        probs, routing_map = self.route(slots_RD, slot_offset=tp_rank * n_r, batch=B,
                                        stats=stats)
        tokens, probs = self.preprocess(slots_RD, probs, routing_map)
        tokens, probs = self.dispatch(tokens, probs)
        out, _ = self.routed_experts_compute(tokens, probs)
        out = self.combine(out)
        slot_out_RD = self.token_dispatcher.combine_postprocess(out)
        if tp > 1:     # every rank's slots, slot-major: [N·B, D]
            slot_out_RD = gather_from_sequence_parallel_region(slot_out_RD, group=self.tp_group)

        slot_out_NBD = slot_out_RD.view(N, B, D).float()
        y_SBD = torch.einsum("sbn,nbd->sbd", combine_SBN, slot_out_NBD).to(hidden_states.dtype)
        if shared_SBD is not None:
            y_SBD = y_SBD + shared_SBD
        return y_SBD, None
