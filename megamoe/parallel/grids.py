"""Named grids: each a `ProcessGroupCollection` over the ranks of one part of the model.

`build_grids(dims)` is the one place that creates process groups. Today there is one grid,
"lm" (the language model's TP × CP × DP × PP attention grid folded with the expert grid
expert-TP × EP × expert-DP × PP). It is built through Megatron's `parallel_state`, because
Megatron's own schedules and DDP still read that global state; everything in megamoe reads
ranks and groups from the collection it is handed (`pg.tp.rank()`, `pg.pp.size()`, `pg.dp`).
A second grid (a vision encoder with its own TP/DP) is one more entry in `GRID_BUILDERS`.

Re-initialisation reuses the groups Megatron created before (`megamoe.platform.group_reuse`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Callable

import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from megamoe.parallel.dims import ParallelDims
from megamoe.platform.group_reuse import reused_groups


class Grids(Mapping):
    """Grid name → `ProcessGroupCollection`, with the degrees each grid was built from."""

    def __init__(self, collections: dict[str, ProcessGroupCollection],
                 dims: dict[str, ParallelDims]):
        assert collections.keys() == dims.keys(), (collections.keys(), dims.keys())
        self._collections, self.dims = dict(collections), dict(dims)

    def __getitem__(self, name: str) -> ProcessGroupCollection:
        if name not in self._collections:
            raise KeyError(f"no grid named {name!r} (built: {', '.join(self._collections)})")
        return self._collections[name]

    def __iter__(self):
        return iter(self._collections)

    def __len__(self) -> int:
        return len(self._collections)

    @property
    def lm(self) -> ProcessGroupCollection:
        return self["lm"]


def init_groups(dims: ParallelDims, timeout_minutes: int = 1) -> ProcessGroupCollection:
    """The "lm" grid: Megatron's groups for `dims` (the default process group must exist),
    replacing any earlier layout's."""
    assert dist.is_initialized(), "init the default process group first (megamoe.launch)"
    assert dist.get_world_size() == dims.world_size, (dist.get_world_size(), dims)
    destroy_groups()
    with reused_groups():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=dims.tensor,
            pipeline_model_parallel_size=dims.pipeline,
            virtual_pipeline_model_parallel_size=dims.virtual_pipeline,
            expert_model_parallel_size=dims.expert,
            expert_tensor_parallel_size=dims.expert_tensor_size,
            distributed_timeout_minutes=timeout_minutes,
            create_gloo_process_groups=dist.get_backend() != "gloo",
        )
    return ProcessGroupCollection.use_mpu_process_groups()


# name → builder; "lm" first: it (re)initialises Megatron's global state the others must not touch
GRID_BUILDERS: dict[str, Callable[[ParallelDims], ProcessGroupCollection]] = {"lm": init_groups}


def build_grids(dims: ParallelDims | Mapping[str, ParallelDims]) -> Grids:
    """Every named grid. `dims`: the "lm" grid's degrees, or grid name → degrees."""
    per_grid = {"lm": dims} if isinstance(dims, ParallelDims) else dict(dims)
    unknown = sorted(set(per_grid) - set(GRID_BUILDERS))
    if unknown:
        raise ValueError(f"grids: unknown {unknown}; known: {', '.join(GRID_BUILDERS)}")
    assert "lm" in per_grid, "every model has the 'lm' grid (Megatron's global state)"
    built = {name: GRID_BUILDERS[name](per_grid[name]) for name in GRID_BUILDERS
             if name in per_grid}
    return Grids(built, {name: per_grid[name] for name in built})


def destroy_groups() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
