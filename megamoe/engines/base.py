"""The engine protocol: what the training loop, the checkpoint code and the commands need from
an engine (Megatron-Core's now, DeepSpeed's next), and nothing else.

An engine receives the model chunks a family built (it builds no model) and owns the wrapping
(DDP, ZeRO), the optimizer, the LR schedule and the pipeline schedule. The loop calls
`train_step` with this rank's micro-batches and gets summed loss statistics back; checkpoints go
through `checkpoint_state` / `load_checkpoint_state` (megamoe.checkpoint.state), so a checkpoint
written by one engine and layout loads into another.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Engine(Protocol):
    cfg: object
    family: object        # megamoe.models.registry.Family
    grid: object          # this model's ProcessGroupCollection (megamoe.parallel)
    dims: object          # megamoe.parallel.ParallelDims
    step: int             # optimizer steps taken
    consumed_samples: int

    @property
    def modules(self) -> list:
        """The unwrapped model chunks of this rank."""

    def train_step(self, microbatches: list) -> dict:
        """Forward, backward and one optimizer step over this rank's micro-batches; returns
        {"loss_sum", "units" (tokens or samples the loss averages over), "grad_norm", "lr",
        "update_ok"} with the loss sums of this rank (the last pipeline stage's)."""

    def eval_step(self, microbatches: list) -> dict:
        """Forward only: {"loss_sum", "units"}."""

    def after_step(self) -> None:
        """Run the family's and routers' after-step hooks (router biases, MoR loss-free bias)."""

    def checkpoint_state(self, *, for_loading: bool = False):
        """A CheckpointState of this rank (for_loading: the templates a load fills)."""

    def load_checkpoint_state(self, state, template) -> None:
        """Put a loaded CheckpointState (`template`: what checkpoint_state(for_loading=True)
        returned for the load) into the modules, optimizer, schedule, progress and RNG."""
