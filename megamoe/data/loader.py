"""The per-DP-rank data loader: resumable, stamps every sample's global `sample_index`, and
leaves collation to the family's task.

Order (megamoe.data.batches): the global batch of the step that starts after `consumed`
samples is global positions consumed … consumed + G − 1 (dataset index = position mod N), and
micro-batch m of DP rank r holds positions [m·b·D + r·b, m·b·D + (r + 1)·b): a function of the
consumed samples only, independent of the DP size, so a run resumes on another layout with the
same data. `sample_index` is the global position (unique over training, unlike the dataset
index, which wraps).

State: `{"consumed_samples": n}` for random-access sources (every source so far); a streaming
source (WebDataset shards) adds its own cursor under `"source"`, which only loads under the same
DP size. Checkpoints written before the loader existed hold `progress.consumed_samples` only,
which is the same state.
"""

from __future__ import annotations

import numpy as np

from megamoe.data.batches import _fetch, global_batch_indices
from megamoe.parallel.dims import microbatches_per_step


class DataLoader:
    def __init__(self, dataset, collate, *, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, consumed_samples: int = 0):
        microbatches_per_step(global_batch_size, micro_batch_size, dp_size)   # divides
        assert 0 <= dp_rank < dp_size, (dp_rank, dp_size)
        self.dataset, self.collate = dataset, collate
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = consumed_samples

    def step_batches(self) -> list:
        """This rank's micro-batches of the next step; advances the state by one global batch."""
        out = self.peek(self.consumed_samples)
        self.consumed_samples += self.global_batch_size
        return out

    def peek(self, consumed_samples: int) -> list:
        """The micro-batches of the step starting after `consumed_samples` (no state change;
        validation reads fixed batches this way)."""
        b, D = self.micro_batch_size, self.dp_size
        idx = global_batch_indices(consumed_samples, self.global_batch_size, len(self.dataset))
        positions = consumed_samples + np.arange(self.global_batch_size, dtype=np.int64)
        out = []
        for m in range(self.global_batch_size // (b * D)):
            start = m * b * D + self.dp_rank * b
            out.append(self.collate(_fetch(self.dataset, idx[start:start + b]),
                                    positions[start:start + b]))
        return out

    def metrics(self) -> dict:
        """Counts for the step metrics (a streaming source counts its bad samples)."""
        return {}

    def state_dict(self) -> dict:
        return {"consumed_samples": int(self.consumed_samples)}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"consumed_samples"}
        if unknown:
            raise ValueError(f"data loader state: unknown entries {sorted(unknown)} (a "
                             "streaming source's cursor; this run's source is random-access)")
        self.consumed_samples = int(state["consumed_samples"])


def make_loader(dataset, collate, **kwargs):
    """This rank's loader over `dataset` (kwargs: DataLoader's): a streaming source (one with
    `make_loader`, megamoe.data.energon_source) makes its own, with the same interface."""
    make = getattr(dataset, "make_loader", None)
    return make(collate, **kwargs) if make is not None else DataLoader(dataset, collate, **kwargs)
