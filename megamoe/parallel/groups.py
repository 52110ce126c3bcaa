"""Megatron parallel groups from typed degrees.

The attention grid is TP × CP × DP × PP; the MoE grid ("parallel folding") is
expert-TP × EP × expert-DP × PP over the same ranks. Megatron's `parallel_state` builds both;
megamoe reads them once into a `ProcessGroupCollection` that modules receive explicitly.

Re-initialisation reuses the groups Megatron created before (`megamoe.platform.group_reuse`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from megamoe.platform.group_reuse import reused_groups


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


def init_groups(dims: ParallelDims, timeout_minutes: int = 1) -> ProcessGroupCollection:
    """Build every group for `dims` (the default process group must exist) and return them."""
    assert dist.is_initialized(), "init the default process group first (megamoe.launch)"
    assert dist.get_world_size() == dims.world_size, (dist.get_world_size(), dims)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
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


def destroy_groups() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()


def seed_rng(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker (dropout inside TP regions)."""
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
