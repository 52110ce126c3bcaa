"""Parallel degrees and every size derived from them, stated once.

Two grids tile the same ranks: the attention grid TP × DP × PP and the MoE grid ("parallel
folding") expert-TP × EP × expert-DP × PP. Code that needs DP, expert-DP, whether sequence
parallelism is on, or how many micro-batches a step has asks a `ParallelDims` instead of
dividing degrees itself, so a new dimension changes one file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megamoe.config.schema import ParallelConfig


def microbatches_per_step(global_batch_size: int, micro_batch_size: int, data: int) -> int:
    """Micro-batches each DP rank runs per step: global batch / (micro batch × DP)."""
    per_micro = micro_batch_size * data
    if global_batch_size % per_micro:
        raise ValueError(f"train.global_batch_size: {global_batch_size} is not a multiple of "
                         f"micro_batch_size × data-parallel size = {micro_batch_size} × {data}")
    return global_batch_size // per_micro


@dataclass(frozen=True)
class ParallelDims:
    """Degrees as configured (`parallel.*`); `sequence_parallel` None means "on when TP > 1"
    and is resolved to a bool on construction (without TP it is a no-op, so always False)."""

    world_size: int
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: Optional[int] = None
    expert: int = 1
    expert_tensor: Optional[int] = None       # None: same as tensor
    sequence_parallel: Optional[bool] = None
    vision_tensor: Optional[int] = None        # vlm: the encoder's TP (None: same as tensor)

    def __post_init__(self):
        sp = self.tensor > 1 if self.sequence_parallel is None else (
            bool(self.sequence_parallel) and self.tensor > 1)
        object.__setattr__(self, "sequence_parallel", sp)
        for name in ("world_size", "tensor", "pipeline", "expert", "expert_tensor_size",
                     "model_chunks"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}: {getattr(self, name)} must be >= 1")
        self._tiles("tensor × pipeline", self.tensor * self.pipeline)
        self._tiles("expert_tensor × expert × pipeline",
                    self.expert_tensor_size * self.expert * self.pipeline)

    def _tiles(self, product: str, size: int) -> None:
        if self.world_size % size:
            raise ValueError(f"parallel.world_size: {self.world_size} is not divisible by "
                             f"{product} = {size}")

    # DP (replicas of the dense weights), expert-TP and expert-DP (replicas of each expert
    # shard): the config's own arithmetic on the same field names, stated once there (the
    # config layer cannot import this one)
    data = ParallelConfig.data
    expert_tensor_size = ParallelConfig.expert_tensor_size
    expert_data = ParallelConfig.expert_data
    vision_tensor_size = ParallelConfig.vision_tensor_size
    vision_data = ParallelConfig.vision_data

    @property
    def separate_vision_grid(self) -> bool:
        """Whether the vision encoder has its own grid (its TP differs from the LM's)."""
        return self.vision_tensor_size != self.tensor

    @property
    def model_chunks(self) -> int:
        """Model chunks per rank: the virtual pipeline degree, 1 without interleaving."""
        return self.virtual_pipeline or 1

    @property
    def virtual_stages(self) -> int:
        """Pipeline stages the layers are split into (PP × VP)."""
        return self.pipeline * self.model_chunks

    def num_microbatches(self, global_batch_size: int, micro_batch_size: int) -> int:
        return microbatches_per_step(global_batch_size, micro_batch_size, self.data)

    def describe(self) -> str:
        s = (f"TP{self.tensor}·PP{self.pipeline}·DP{self.data}·EP{self.expert}"
             f"·ETP{self.expert_tensor_size}")
        s += f"·VP{self.virtual_pipeline}" if self.virtual_pipeline else ""
        if self.separate_vision_grid:
            s += f" (vision encoder TP{self.vision_tensor_size}·DP{self.vision_data})"
        return s + ("·SP" if self.sequence_parallel else "")

    @classmethod
    def from_config(cls, parallel_cfg) -> "ParallelDims":
        p = parallel_cfg
        return cls(world_size=p.world_size, tensor=p.tensor, pipeline=p.pipeline,
                   virtual_pipeline=p.virtual_pipeline, expert=p.expert,
                   expert_tensor=p.expert_tensor, sequence_parallel=p.sequence_parallel,
                   vision_tensor=p.vision_tensor)
