"""The one place that creates process groups: degrees (`ParallelDims`, every derived size) →
named grids (`build_grids`, each a Megatron `ProcessGroupCollection`)."""

from megamoe.parallel.dims import ParallelDims, microbatches_per_step
from megamoe.parallel.grids import Grids, build_grids, destroy_groups, init_groups
from megamoe.parallel.rng import seed_rng

__all__ = ["ParallelDims", "microbatches_per_step", "Grids", "build_grids", "init_groups",
           "destroy_groups", "seed_rng"]
