"""Per-expert FP8 scaling state: an amax history for every local expert, projection and tensor
(x, w, g), and the overflow/underflow counters of the casts.

Replicas of an expert (expert-data-parallel and expert-tensor-parallel ranks) all-reduce their
amaxes (MAX) before any scale is computed, so their scales and histories stay identical. The
history is model state: it is saved per global expert and reshards with the experts
(`sharded_state`).

Legend: E local experts, P projections (fc1, fc2), H history length.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.fp8.formats import Format, scale_from_amax

X, W, G = 0, 1, 2      # tensor slots of the history: input, weight, output gradient


class FP8ScalingState(torch.nn.Module):
    def __init__(self, num_local_experts: int, num_projections: int = 2, history_len: int = 1):
        super().__init__()
        self.register_buffer(
            "amax_history", torch.zeros(num_local_experts, num_projections, 3, history_len))
        self.replica_groups: list = []     # process groups whose ranks hold the same experts
        self.overflow = 0                  # saturated casts since the last read
        self.underflow = 0                 # nonzero values cast to zero since the last read
        self.last_local_amax = None        # the latest amaxes before the all-reduce (tests)

    def sync_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """MAX over the replicas of these experts (in place; returned for chaining)."""
        self.last_local_amax = amax.detach().clone()
        for group in self.replica_groups:
            dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
        return amax

    def scales(self, proj: int, slot: int, amax_E: torch.Tensor, fmt: Format, margin: int,
               delayed: bool) -> torch.Tensor:
        """Dequantisation scale per expert [E]. Delayed: from the history's max; an expert whose
        history is still empty (first step) uses the current amax instead of an arbitrary 1."""
        if delayed:
            past_E = self.amax_history[:, proj, slot].amax(-1)
            amax_E = torch.where(past_E > 0, past_E, amax_E)
        return scale_from_amax(amax_E, fmt, margin)

    @torch.no_grad()
    def record(self, proj: int, slot: int, amax_E: torch.Tensor) -> None:
        hist_EH = self.amax_history[:, proj, slot]
        hist_EH.copy_(torch.roll(hist_EH, 1, dims=-1))
        hist_EH[:, 0] = amax_E

    def count(self, overflow: int, underflow: int) -> None:
        self.overflow += overflow
        self.underflow += underflow

    def read_counters(self) -> dict:
        out = {"fp8_overflow": self.overflow, "fp8_underflow": self.underflow}
        self.overflow = self.underflow = 0
        return out

    def sharded_state(self, key: str, sharded_offsets: tuple, ep_rank: int, ep_size: int,
                      replica_id: tuple) -> dict:
        """The history as one global tensor [E_global, P, 3, H] sharded over EP ranks."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        n = len(sharded_offsets)
        return {key: ShardedTensor.from_rank_offsets(
            key, self.amax_history, *sharded_offsets, (n, ep_rank, ep_size),
            replica_id=replica_id, prepend_axis_num=n)}
