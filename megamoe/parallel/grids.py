"""Named grids: each a `ProcessGroupCollection` over the ranks of one part of the model.

`build_grids(dims)` is the one place that creates process groups. "lm" is the language
model's TP × CP × DP × PP attention grid folded with the expert grid expert-TP × EP × expert-DP
× PP. It is built through Megatron's `parallel_state`, because Megatron's own schedules and DDP
still read that global state; everything in megamoe reads ranks and groups from the collection
it is handed (`pg.tp.rank()`, `pg.pp.size()`, `pg.dp`). "vision" (built when
`parallel.vision_tensor` differs from the LM's TP) is the vlm encoder's own TP × DP over the
first pipeline stage's ranks (`VisionGrid`).

Re-initialisation reuses the groups Megatron created before (`megamoe.platform.group_reuse`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from megamoe.parallel.dims import ParallelDims
from megamoe.platform.group_reuse import reused_groups


@dataclass
class VisionGrid:
    """The vision encoder's grid on the first pipeline stage (None groups on other stages).

    Ranks of the first stage are (LM DP index j, LM TP index i); with encoder TP tv dividing
    the LM's tl, rank (j, i) has encoder TP index t = i mod tv and encoder DP index
    k = j·(tl/tv) + i div tv. `pg.tp`: same k; `pg.dp`: same t, ordered by k; `replicas`: same
    j and t (the encoder replicas inside one LM TP group, tl/tv of them); `first_stage`: all of
    the stage's ranks (also `pg.tp_dp_cp`). `pg`'s expert groups (ep, expt_tp, tp_ep, expt_dp)
    are the LM's."""
    pg: ProcessGroupCollection | None
    replicas: object
    first_stage: object
    dp_rank: int           # k
    lm_tp_size: int        # tl: copies of each LM sample's gradient on the first stage


class Grids(Mapping):
    """Grid name → the grid (a `ProcessGroupCollection`; "vision": a `VisionGrid`), with the
    degrees each grid was built from."""

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

    @property
    def vision(self) -> "VisionGrid | None":
        """The vision encoder's own grid, None when it shares the LM's."""
        return self._collections.get("vision")


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


_GROUPS: dict = {}


def _group(ranks: list[int]):
    """A process group over `ranks` (every rank calls this, in the same order), made once per
    default group and reused by later layouts (test pools re-initialise hundreds of times)."""
    key = (id(dist.group.WORLD), tuple(ranks))
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(list(ranks))
    return _GROUPS[key]


def init_vision_groups(dims: ParallelDims, built: dict) -> VisionGrid:
    """The vision encoder's grid (`VisionGrid`) from the "lm" grid's coordinates of every
    rank (gathered: no assumption on Megatron's rank order)."""
    lm = built["lm"]
    tl, tv = dims.tensor, dims.vision_tensor_size
    assert tl % tv == 0 and lm.cp.size() == 1, (tl, tv)
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, (dist.get_rank(), lm.pp.rank(), lm.dp.rank(), lm.tp.rank()))
    coords = {r: (dp * (tl // tv) + tp // tv, tp % tv, dp) for r, pp, dp, tp in views if pp == 0}
    first = sorted(coords)

    def groups(key) -> dict:
        out = {}
        for r in first:
            out.setdefault(key(*coords[r]), []).append(r)
        return {name: sorted(ranks, key=lambda r: coords[r][0]) for name, ranks in out.items()}

    tp_groups = groups(lambda k, t, j: k)
    dp_groups = groups(lambda k, t, j: t)
    replica_groups = groups(lambda k, t, j: (j, t))
    made = {name: {key: _group(ranks) for key, ranks in sorted(g.items())}
            for name, g in (("tp", tp_groups), ("dp", dp_groups), ("replicas", replica_groups))}
    stage = _group(first)
    me = dist.get_rank()
    if me not in coords:
        return VisionGrid(None, None, None, -1, tl)
    k, t, j = coords[me]
    fields = {name: getattr(lm, name) for name in ("pp", "cp", "mp", "embd", "pos_embd", "hcp",
                                                   "ep", "expt_tp", "tp_ep", "tp_ep_pp",
                                                   "expt_dp") if hasattr(lm, name)}
    # the expert groups are the LM's (an MoE encoder's experts live on the LM's expert grid,
    # megamoe.models.vlm.model); the encoder's TP × DP is the whole stage
    pg = ProcessGroupCollection(**fields, tp=made["tp"][k], dp=made["dp"][t],
                                dp_cp=made["dp"][t], tp_cp=made["tp"][k], tp_dp_cp=stage)
    return VisionGrid(pg, made["replicas"][(j, t)], stage, k, tl)


# name → builder (dims, grids built so far); "lm" first: it (re)initialises Megatron's global
# state the others must not touch
GRID_BUILDERS: dict[str, Callable] = {"lm": lambda dims, built: init_groups(dims),
                                      "vision": init_vision_groups}


def build_grids(dims: ParallelDims | Mapping[str, ParallelDims]) -> Grids:
    """Every named grid. `dims`: the model's degrees (the "lm" grid, and the "vision" grid
    when the encoder has its own TP), or grid name → degrees."""
    if isinstance(dims, ParallelDims):
        per_grid = {"lm": dims, **({"vision": dims} if dims.separate_vision_grid else {})}
    else:
        per_grid = dict(dims)
    unknown = sorted(set(per_grid) - set(GRID_BUILDERS))
    if unknown:
        raise ValueError(f"grids: unknown {unknown}; known: {', '.join(GRID_BUILDERS)}")
    assert "lm" in per_grid, "every model has the 'lm' grid (Megatron's global state)"
    built: dict = {}
    for name in GRID_BUILDERS:
        if name in per_grid:
            built[name] = GRID_BUILDERS[name](per_grid[name], built)
    return Grids(built, {name: per_grid[name] for name in built})


def destroy_groups() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
