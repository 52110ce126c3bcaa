"""Micro-batch-wide routing decisions and losses under sequence parallelism.

Under TP + SP each TP rank holds S/TP of the sequence; Megatron's [S, B] flattening means that
concatenating the ranks' token rows along dim 0 gives the micro-batch's tokens in order. A router
whose selection group is the micro-batch (capacity, batch priority) gathers the *detached*
scores, decides on the whole micro-batch and keeps its own rows (DESIGN.md, parity rule). A loss
that is a function of micro-batch sums (importance, load, entropies) all-reduces the partial sums
with `sum_over_ranks`: the value is the micro-batch's, the gradient reaches this rank's tokens
only, so every rank's backward yields exactly its share of the reference's gradient.

Shapes: T tokens of this rank, N = T·TP tokens of the micro-batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class SequenceShards:
    """Where this rank's tokens sit in the micro-batch (identity when SP is off)."""

    def __init__(self, tp_group, sequence_parallel: bool):
        active = (sequence_parallel and tp_group is not None and dist.is_initialized()
                  and dist.get_world_size(tp_group) > 1)
        self.group = tp_group if active else None
        self.size = dist.get_world_size(tp_group) if active else 1
        self.rank = dist.get_rank(tp_group) if active else 0

    def gather(self, x_T: torch.Tensor) -> torch.Tensor:
        """[N, ...] detached: every rank's rows, in sequence order."""
        x_T = x_T.detach()
        if self.group is None:
            return x_T
        parts = [torch.empty_like(x_T) for _ in range(self.size)]
        dist.all_gather(parts, x_T.contiguous(), group=self.group)
        return torch.cat(parts, dim=0)

    def local(self, x_N: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a micro-batch-wide tensor."""
        T = x_N.shape[0] // self.size
        return x_N[self.rank * T:(self.rank + 1) * T]

    def sum_over_ranks(self, partial: torch.Tensor) -> torch.Tensor:
        """Σ over the TP ranks of `partial`; gradients flow to the local term only."""
        if self.group is None:
            return partial
        total = partial.detach().clone()
        dist.all_reduce(total, group=self.group)
        return partial + (total - partial.detach())
