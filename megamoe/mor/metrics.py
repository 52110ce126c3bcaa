"""Mixture-of-Recursions training metrics: the depth statistics the loop logs."""

from __future__ import annotations

import torch
import torch.distributed as dist


class MoRDepthStats:
    """Depth statistics of the Mixture-of-Recursions blocks (megamoe.mor) since the last read.

    A forward hook on every `RecursionBlock` accumulates, per training-mode forward, the share of
    tokens that run each recursion step (from the block's `last_stats`: expert-choice
    `step_{r}_kept_fraction`, token-choice `depth_{i}_fraction`) and the expert-choice sampling
    accuracy. `read` averages over forwards and ranks (TP ranks hold equal values) and turns the
    shares into a histogram of token counts per depth d = recursion steps run (0..N_r). Under
    pipeline parallelism only the block's stage records; every rank reduces N_r rows."""

    def __init__(self, chunks, num_recursions: int):
        from megamoe.mor.block import RecursionBlock

        blocks = [m for c in chunks for m in c.modules() if isinstance(m, RecursionBlock)]
        self.num_recursions = num_recursions
        self.sums: dict[str, float] = {}
        self.count = 0
        self.handles = [b.register_forward_hook(self._record) for b in blocks]

    def _record(self, block, _inputs, _output) -> None:
        if not block.training:
            return
        s, R = block.last_stats, len(block.steps)
        if "step_0_kept_fraction" in s:          # expert-choice
            kept = [s[f"step_{r}_kept_fraction"] for r in range(R)]
        else:                                    # token-choice: step r runs depths ≥ r
            kept = [sum(s[f"depth_{i}_fraction"] for i in range(r, R)) for r in range(R)]
        values = {f"kept_step_{r + 1}": f for r, f in enumerate(kept)}
        values.update({f"sampling_acc_step_{r + 1}": s[f"step_{r}_sampling_acc"]
                       for r in range(R) if f"step_{r}_sampling_acc" in s})
        for name, v in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + v
        self.count += 1

    def read(self, tokens: int) -> dict:
        """{"mor/kept_step_r": share of tokens run at step r (r = 1..N_r), "mor/sampling_acc_step_r"
        (expert-choice), "mor/depth": [tokens of depth 0, …, N_r]} over `tokens`, the global
        batch's token count; the histogram sums to `tokens`. Resets the sums."""
        R = self.num_recursions
        names = [f"kept_step_{r + 1}" for r in range(R)]
        names += [f"sampling_acc_step_{r + 1}" for r in range(R)]
        t = torch.tensor([[self.sums.get(n, 0.0), float(self.count if n in self.sums else 0)]
                          for n in names], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        self.sums, self.count = {}, 0
        means = {n: (t[i, 0] / t[i, 1]).item() for i, n in enumerate(names) if t[i, 1] > 0}
        out = {f"mor/{n}": v for n, v in means.items()}
        # tokens with depth ≥ d, d = 0..N_r+1: the histogram telescopes to `tokens`
        at_least = [tokens] + [round(means.get(n, 0.0) * tokens) for n in names[:R]] + [0]
        out["mor/depth"] = [at_least[d] - at_least[d + 1] for d in range(R + 1)]
        return out
