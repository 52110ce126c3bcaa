"""The one place that creates process groups: degrees → Megatron groups → ProcessGroupCollection."""

from megamoe.parallel.groups import ParallelDims, destroy_groups, init_groups, seed_rng

__all__ = ["ParallelDims", "init_groups", "destroy_groups", "seed_rng"]
