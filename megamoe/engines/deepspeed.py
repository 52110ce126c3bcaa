"""The DeepSpeed engine (megamoe.engines.base protocol, `train.engine: deepspeed`): the family's
model chunk under DeepSpeed's ZeRO stage 1 or 2 optimizer, on megamoe's own process groups, with
the Megatron engine's loss normalisation, clipping, LR schedule and checkpoint state.

- Groups: megamoe's EP and expert-DP groups are registered in `deepspeed.utils.groups` and the
  dense DP group is handed over through an `mpu` (megamoe.platform.deepspeed_bridge), which also
  makes DeepSpeed see megamoe's MoE layers. TP and PP are refused by the config checks.
- Loss: the mean over every loss unit of the global batch, as under Megatron's
  `calculate_per_token_loss`. Each micro-batch back-propagates its loss *sum* (router losses at
  scale 1, as Megatron's schedule sets them); DeepSpeed averages the dense gradients over DP and
  divides the expert gradients (summed over expert-DP) by the dense DP size; the remaining
  factor DP / (global unit count) is applied by the ZeRO optimizer's external loss scale at the
  step, so the clipping norm and the update see Megatron's gradients exactly.
- Optimizer: torch AdamW / SGD over Megatron's parameter groups (no weight decay on biases and
  1-D tensors; expert groups marked `moe` with their group name), clipped at `train.clip_grad`,
  scheduled by Megatron's OptimizerParamScheduler.
- Checkpoints: per-parameter optimizer state read and written through DeepSpeed's
  `safe_get_full_*` / `safe_set_full_*` under the same global keys as the Megatron engine
  (megamoe.engines.deepspeed_state), so a checkpoint moves between engines and layouts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.distributed as dist

from megamoe.blocks.norms import skips_weight_decay
from megamoe.checkpoint.state import CheckpointState
from megamoe.parallel import ParallelDims


@dataclass
class DeepSpeedEngine:
    cfg: object
    family: object
    dims: ParallelDims
    grid: object            # the model's ProcessGroupCollection
    tconfig: object
    ds: object              # deepspeed.DeepSpeedEngine around the model chunk
    scheduler: object = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    step: int = 0
    consumed_samples: int = 0
    vocab_size: int = 0
    data_state: dict = field(default_factory=dict)

    @property
    def pg(self):
        return self.grid

    @property
    def optimizer(self):
        """DeepSpeed's ZeRO optimizer."""
        return self.ds.optimizer

    @property
    def modules(self) -> list:
        return [self.ds.module]

    @property
    def padded_vocab_size(self) -> int | None:
        return getattr(self.modules[0], "vocab_size", None)

    @cached_property
    def task(self):
        return self.family.task(self.cfg)

    @cached_property
    def moe_layers(self) -> list:
        from megamoe.models.lm.model import moe_layers

        return moe_layers(self.modules)

    @cached_property
    def hooks(self) -> list:
        make = self.family.after_step_hooks
        return make(self.modules, self.grid) if make else []

    # -- the protocol (megamoe.engines.base) -------------------------------------------------

    def train_step(self, microbatches: list) -> dict:
        zero, last = self.ds.optimizer, len(microbatches) - 1
        assert last + 1 == self.ds.gradient_accumulation_steps(), (
            last + 1, self.ds.gradient_accumulation_steps())
        lr, total = zero.param_groups[0]["lr"], torch.zeros(2)
        for i, mb in enumerate(microbatches):
            loss_sum, _, report = self._forward(mb)
            total += report
            _set_aux_loss_scale()
            self.ds.backward(loss_sum, scale_wrt_gas=False)
            if i == last:
                # the reduced gradients hold Σ(unit losses)/DP: the step divides by N/DP
                n = units_global(total[1].item(), self.grid.dp)
                zero.external_loss_scale = max(n, 1.0) / self.grid.dp.size()
            try:
                self.ds.step()       # DeepSpeed counts micro-batches; it steps at the last
            finally:
                zero.external_loss_scale = 1.0
        norm = self.ds.get_global_grad_norm()
        self.after_step()
        self.scheduler.step(increment=1)
        self.step += 1
        return {"loss_sum": total[0].item(), "units": total[1].item(),
                "grad_norm": float(norm) if norm is not None else 0.0, "lr": lr,
                "update_ok": not bool(getattr(zero, "overflow", False))}

    def eval_step(self, microbatches: list) -> dict:
        module, total = self.ds.module, torch.zeros(2)
        module.eval()
        try:
            with torch.no_grad():
                for mb in microbatches:
                    total += self._forward(mb, module)[2]
        finally:
            module.train()
        return {"loss_sum": total[0].item(), "units": total[1].item()}

    def after_step(self) -> None:
        for hook in self.hooks:
            hook()

    def checkpoint_state(self, *, for_loading: bool = False) -> CheckpointState:
        from megamoe.checkpoint.save import model_sharded_state_dict, rng_sharded
        from megamoe.engines.deepspeed_state import sharded_optimizer_state

        return CheckpointState(
            model=model_sharded_state_dict(self.modules),
            progress={"step": self.step, "consumed_samples": self.consumed_samples},
            optimizer=sharded_optimizer_state(self, for_loading),
            scheduler=self.scheduler.state_dict(),
            data=dict(self.data_state),
            rng=rng_sharded())

    def load_checkpoint_state(self, state: CheckpointState, template: CheckpointState) -> None:
        from megamoe.checkpoint.load import set_rng
        from megamoe.engines.deepspeed_state import load_optimizer_state, refresh_master_params

        self.modules[0].load_state_dict(state.model["model"], strict=True)
        refresh_master_params(self)
        if template.optimizer and state.optimizer is not None:
            load_optimizer_state(self, template.optimizer, state.optimizer)
        if state.scheduler is not None:
            self.scheduler.load_state_dict(state.scheduler)
        self.step = int(state.progress["step"])
        self.consumed_samples = int(state.progress["consumed_samples"])
        self.data_state = dict(state.data)
        if state.rng is not None:
            set_rng(state.rng)

    # -- helpers ------------------------------------------------------------------------------

    def _forward(self, mb: dict, model=None):
        """(loss sum, unit count, [loss sum, units] for reporting) of one micro-batch; the
        family's task in Megatron's forward-step convention."""
        output, loss_func = self.task.forward_step(model or self.ds, mb, self.device, self.step)
        loss_sum, units, reported = loss_func(output)
        return loss_sum, units, reported["loss"].detach().float().cpu()


def units_global(local_units: float, dp_group) -> float:
    """The loss units (tokens, samples) of the whole global batch."""
    t = torch.tensor([local_units], dtype=torch.float64)
    dist.all_reduce(t, group=dp_group)
    return t.item()


def _set_aux_loss_scale() -> None:
    """Router losses enter the backward at scale 1 per micro-batch, as Megatron's schedule sets
    them under per-token loss (their gradients are then normalised with the main loss's)."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))


def param_groups(module, cfg, expert_group: str | None) -> list[dict]:
    """Megatron's optimizer parameter groups: weight decay off where `skips_weight_decay` says
    (biases, 1-D tensors, marked norm parameters), experts apart (DeepSpeed: `moe` groups named by their expert group)."""
    t, groups = cfg.train, {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        wd_mult = 0.0 if skips_weight_decay(name, p) else 1.0
        expert = not getattr(p, "allreduce", True)
        groups.setdefault((expert, wd_mult), []).append(p)
    out = []
    for (expert, wd_mult), params in sorted(groups.items()):
        group = {"params": params, "wd_mult": wd_mult, "lr_mult": 1.0, "max_lr": t.lr,
                 "min_lr": t.min_lr, "weight_decay": t.weight_decay * wd_mult}
        if expert:
            assert expert_group is not None, "expert parameters without expert parallelism"
            group.update(moe=True, name=expert_group)
        out.append(group)
    return out


def torch_optimizer(groups: list[dict], cfg):
    t = cfg.train
    if t.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2),
                                 eps=t.adam_eps, weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, lr=t.lr, momentum=0.0, weight_decay=t.weight_decay)


def ds_config(cfg, dims: ParallelDims, dtype: torch.dtype) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": dims.num_microbatches(t.global_batch_size,
                                                             t.micro_batch_size),
        "train_batch_size": t.global_batch_size,
        "gradient_clipping": t.clip_grad,          # DeepSpeed's default would be 1.0
        "zero_optimization": {
            "stage": t.zero_stage,
            # what DeepSpeed's ZeRO requires with MoE parameter groups
            "contiguous_gradients": True,
            "reduce_scatter": True,
            "overlap_comm": False,
        },
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def build_engine(cfg, vocab_size: int, device: torch.device) -> DeepSpeedEngine:
    """The family's chunk for this rank (as the Megatron engine builds it) under ZeRO."""
    import deepspeed

    from megamoe.engines.megatron import build_model, build_scheduler
    from megamoe.moe.layer import MegamoeMoELayer
    from megamoe.models.lm.model import moe_layers
    from megamoe.platform import deepspeed_bridge as patch

    patch.check_deepspeed_version()
    _quiet_deepspeed()
    # DeepSpeed asserts a launcher's local rank; megamoe picked the device already (its
    # launchers, Slurm or the test pool may set none): DeepSpeed then places on that device
    if "LOCAL_RANK" not in os.environ and "OMPI_COMM_WORLD_LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(device.index or 0)
    family, dims, grid, tconfig, chunks, dtype = build_model(cfg, vocab_size, device)
    assert len(chunks) == 1, "the config checks refuse pipeline stages under deepspeed"
    module = chunks[0]
    layers = moe_layers(chunks) if dims.expert > 1 else []
    name = patch.expert_group_name(dims.expert) if layers else None
    for layer in layers:
        for p in layer.experts.parameters():
            if not getattr(p, "allreduce", True):
                p.group_name = name        # DeepSpeed's key into its expert groups
    patch.register_groups(name or patch.expert_group_name(1), grid.ep, grid.expt_dp,
                          patch.GridMpu(grid))
    optimizer = torch_optimizer(param_groups(module, cfg, name), cfg)
    config = ds_config(cfg, dims, dtype)
    patch.init_comm()
    if layers:
        with patch.moe_visible(MegamoeMoELayer, layers, cfg.model.moe.num_experts):
            ds, zero, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                                  config=config, dist_init_required=False)
    else:
        ds, zero, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                              dist_init_required=False)
    assert ds.has_moe_layers == bool(layers)
    zero.override_loss_scale(1.0)     # train_step sets the per-step normalisation on it
    return DeepSpeedEngine(cfg=cfg, family=family, dims=dims, grid=grid, tconfig=tconfig, ds=ds,
                           scheduler=build_scheduler(cfg, zero), device=device,
                           vocab_size=vocab_size)


def _quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
