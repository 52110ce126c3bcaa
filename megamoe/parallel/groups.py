"""Megatron parallel groups from typed degrees.

The attention grid is TP × CP × DP × PP; the MoE grid ("parallel folding") is
expert-TP × EP × expert-DP × PP over the same ranks. Megatron's `parallel_state` builds both;
megamoe reads them once into a `ProcessGroupCollection` that modules receive explicitly.

Megatron's `destroy_model_parallel` forgets its groups without destroying them, so every
re-initialisation in a long-lived process (the test pool runs hundreds of layouts) used to leak
each group's sockets and threads (thousands per worker). megamoe creates each distinct group
once per default process group and reuses it: `init_groups` routes Megatron's `create_group`
through a cache keyed by ranks, backend, timeout and description.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    expert: int = 1
    expert_tensor: Optional[int] = None

    @property
    def data(self) -> int:
        return self.world_size // (self.tensor * self.pipeline)

    @property
    def expert_tensor_size(self) -> int:
        return self.tensor if self.expert_tensor is None else self.expert_tensor

    @property
    def expert_data(self) -> int:
        return self.world_size // (self.expert_tensor_size * self.expert * self.pipeline)

    def describe(self) -> str:
        s = f"TP{self.tensor}·PP{self.pipeline}·DP{self.data}·EP{self.expert}·ETP{self.expert_tensor_size}"
        return s + (f"·VP{self.virtual_pipeline}" if self.virtual_pipeline else "")

    @classmethod
    def from_config(cls, parallel_cfg) -> "ParallelDims":
        return cls(world_size=parallel_cfg.world_size, tensor=parallel_cfg.tensor,
                   pipeline=parallel_cfg.pipeline,
                   virtual_pipeline=parallel_cfg.virtual_pipeline,
                   expert=parallel_cfg.expert, expert_tensor=parallel_cfg.expert_tensor)


_GROUPS: dict = {}


def _cached_create_group(create_group):
    def create(ranks=None, timeout=None, backend=None, pg_options=None,
               use_local_synchronization=False, group_desc=None):
        kwargs = dict(ranks=ranks, timeout=timeout, backend=backend, pg_options=pg_options,
                      use_local_synchronization=use_local_synchronization, group_desc=group_desc)
        if pg_options is not None or use_local_synchronization:
            return create_group(**kwargs)         # options objects compare by identity
        key = (id(dist.group.WORLD), tuple(ranks), backend, timeout, group_desc)
        if key not in _GROUPS:
            _GROUPS[key] = create_group(**kwargs)
        return _GROUPS[key]

    return create


@contextlib.contextmanager
def _reused_groups():
    original = parallel_state.create_group
    parallel_state.create_group = _cached_create_group(original)
    try:
        yield
    finally:
        parallel_state.create_group = original


def init_groups(dims: ParallelDims, timeout_minutes: int = 1) -> ProcessGroupCollection:
    """Build every group for `dims` (the default process group must exist) and return them."""
    assert dist.is_initialized(), "init the default process group first (megamoe.launch)"
    assert dist.get_world_size() == dims.world_size, (dist.get_world_size(), dims)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    with _reused_groups():
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


def destroy_groups() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def seed_rng(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker (dropout inside TP regions)."""
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
