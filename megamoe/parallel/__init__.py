"""The one place that creates process groups: degrees (`ParallelDims`, every derived size) →
named grids (`build_grids`, each a Megatron `ProcessGroupCollection`).

Names are imported lazily: the sizes (`megamoe.parallel.dims`) need neither torch nor Megatron,
so the data layer and config-time checks can use them without importing Megatron (seconds).
"""

from importlib import import_module

_EXPORTS = {
    "ParallelDims": "dims",
    "microbatches_per_step": "dims",
    "Grids": "grids",
    "build_grids": "grids",
    "init_groups": "grids",
    "destroy_groups": "grids",
    "seed_rng": "rng",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megamoe.parallel' has no attribute {name!r}")
    return getattr(import_module(f"megamoe.parallel.{_EXPORTS[name]}"), name)
