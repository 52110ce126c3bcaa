"""The Megatron engine (megamoe.engines.base protocol): a family's model chunks wrapped in
Megatron DDP, Megatron's optimizer (optionally distributed) and LR schedule, one `train_step`
over Megatron's pipeline schedules, and the engine-neutral checkpoint state.

Loss is the mean over every loss unit (token, or sample) of the global batch
(`calculate_per_token_loss`): micro-batches return loss sums and unit counts (the family's task),
and `finalize_model_grads` divides by the global count, so any DP size / micro-batch split gives
the same gradients. The engine builds no model: `build_engine` asks the family for the chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, partial

import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, ParamGroupOverride
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from megamoe.blocks.norms import skips_weight_decay
from megamoe.checkpoint.state import CheckpointState
from megamoe.models.init import init_global
from megamoe.models.registry import family_for
from megamoe.moe.experts.choice import with_resolved_experts
from megamoe.parallel import ParallelDims, build_grids, seed_rng


@dataclass
class MegatronEngine:
    cfg: object
    family: object
    dims: ParallelDims
    grid: object            # the model's ProcessGroupCollection
    tconfig: object
    chunks: list            # DDP-wrapped model chunks (or bare chunks when no optimizer)
    optimizer: object = None
    scheduler: object = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    step: int = 0
    consumed_samples: int = 0
    vocab_size: int = 0     # the tokenizer's; the model's rows are padded_vocab_size
    data_state: dict = field(default_factory=dict)   # the loader's, saved in checkpoints

    @property
    def pg(self):
        """The grid (the name the test helpers use)."""
        return self.grid

    @property
    def padded_vocab_size(self) -> int | None:
        """Rows of the embedding and output layer (megamoe.models.vocab); None for a family
        without a vocabulary."""
        return getattr(self.modules[0], "vocab_size", None)

    @property
    def modules(self) -> list:
        """The unwrapped model chunks."""
        return [getattr(c, "module", c) for c in self.chunks]

    @cached_property
    def task(self):
        return self.family.task(self.cfg)

    @cached_property
    def moe_layers(self) -> list:
        """This rank's megamoe MoE layers (found once: the per-step readers walk this list, not
        the module tree)."""
        from megamoe.models.lm.model import moe_layers

        return moe_layers(self.modules)

    @cached_property
    def hooks(self) -> list:
        """The family's after-step hooks (routers, MoR), found once."""
        make = self.family.after_step_hooks
        return make(self.modules, self.grid) if make else []

    # -- the protocol (megamoe.engines.base) -------------------------------------------------

    def train_step(self, microbatches: list) -> dict:
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        stats = run_forward_backward(self, microbatches)
        stats.update(optimizer_step(self))
        return stats

    def eval_step(self, microbatches: list) -> dict:
        for c in self.chunks:
            c.eval()
        try:
            with torch.no_grad():
                return run_forward_backward(self, microbatches, forward_only=True)
        finally:
            for c in self.chunks:
                c.train()

    def after_step(self) -> None:
        for hook in self.hooks:
            hook()

    def checkpoint_state(self, *, for_loading: bool = False) -> CheckpointState:
        from megamoe.checkpoint.save import model_sharded_state_dict, rng_sharded
        from megamoe.engines.megatron_optimizer_state import sharded_optimizer_state

        return CheckpointState(
            model=model_sharded_state_dict(self.modules),
            progress={"step": self.step, "consumed_samples": self.consumed_samples},
            optimizer=(sharded_optimizer_state(self, self.step, for_loading)
                       if self.optimizer is not None else None),
            scheduler=self.scheduler.state_dict() if self.scheduler is not None else None,
            data=dict(self.data_state),
            rng=rng_sharded())

    def load_checkpoint_state(self, state: CheckpointState, template: CheckpointState) -> None:
        from megamoe.checkpoint.load import set_rng
        from megamoe.engines.megatron_optimizer_state import copy_loaded

        for name, chunk in zip(sorted(state.model, key=_chunk_order), self.modules):
            chunk.load_state_dict(state.model[name], strict=True)
        if self.optimizer is not None:
            # the optimizer's fp32 master copies (bf16 training) follow the loaded weights,
            # then the saved master weights and Adam moments (if any) overwrite them
            reload = getattr(self.optimizer, "reload_model_params", None)
            if reload is not None:
                reload()
            if template.optimizer and state.optimizer is not None:
                copy_loaded(template.optimizer, state.optimizer, self)
        if self.scheduler is not None and state.scheduler is not None:
            self.scheduler.load_state_dict(state.scheduler)
        self.step = int(state.progress["step"])
        self.consumed_samples = int(state.progress["consumed_samples"])
        self.data_state = dict(state.data)
        if state.rng is not None:
            set_rng(state.rng)


Engine = MegatronEngine   # the name the test helpers and tools use


def _chunk_order(name: str) -> int:
    return int(name[5:] or 0)     # "model", "model0", "model1", …


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def build_engine(cfg, vocab_size: int, device: torch.device, *, with_optimizer: bool = True,
                 ddp: bool = True) -> MegatronEngine:
    """Groups for the config's layout, the family's chunks for this rank (initialised as a
    function of the global parameter), DDP and the optimizer."""
    family, dims, grid, tconfig, chunks, dtype = build_model(cfg, vocab_size, device)
    if ddp:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        chunks = [
            DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=c,
                                    disable_bucketing=i > 0, pg_collection=grid)
            for i, c in enumerate(chunks)
        ]
        tconfig.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        tconfig.finalize_model_grads_func = partial(
            _finalize_model_grads, pg_collection=grid,
            before=getattr(tconfig, "family_grad_sync", None))
    engine = MegatronEngine(cfg=cfg, family=family, dims=dims, grid=grid, tconfig=tconfig,
                            chunks=chunks, device=device, vocab_size=vocab_size)
    if with_optimizer:
        engine.optimizer, engine.scheduler = build_optimizer(cfg, chunks, dtype, grid)
    return engine


def build_model(cfg, vocab_size: int, device: torch.device):
    """(family, dims, grid, transformer config, chunks, dtype): the groups for the config's
    layout and the family's chunks for this rank, initialised as a function of the global
    parameter (every engine starts from this). Megatron's aux-loss tracker, a process-wide
    dict sized by the model it first saw, starts empty: a process that built another model (a
    test pool's worker) would otherwise index its entries with this model's layer numbers
    (IndexError past their size) or reduce them over that model's stale groups. Likewise the
    aux-loss backward scale, process-wide too: a backward without the schedule creates it with
    shape [], which the schedule's later copy of a [1] scale refuses."""
    from megatron.core.transformer.moe.moe_utils import (MoEAuxLossAutoScaler,
                                                         get_moe_layer_wise_logging_tracker)

    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.main_loss_backward_scale = None
    cfg = with_resolved_experts(cfg, device.type)      # model.moe.experts=auto: this device's
    family = family_for(cfg)
    dims = ParallelDims.from_config(cfg.parallel)
    grids = build_grids(dims)
    grid = grids.lm
    seed_rng(cfg.run.seed)
    dtype = resolve_dtype(cfg.train.precision, device)
    tconfig = family.transformer_config(cfg, dims, sequence_parallel=dims.sequence_parallel,
                                        dtype=dtype)
    chunks = family.build(cfg, tconfig, grid, vocab_size, grids=grids)
    for c in chunks:
        c.to(device)
    init_global(chunks, cfg.run.seed, cfg.model.init_method_std, cfg.model.num_layers)
    if family.grad_sync is not None:     # e.g. the vlm encoder's replicas on its own grid
        tconfig.family_grad_sync = family.grad_sync(chunks, grids)
    return family, dims, grid, tconfig, chunks, dtype


def _finalize_model_grads(*args, pg_collection, before=None, **kwargs):
    """Megatron's gradient finalisation (DP reduction, embedding ties, division by the global
    loss-unit count), after the family's own reduction `before` if it has one."""
    if before is not None:
        before()
    return finalize_model_grads(*args, pg_collection=pg_collection, **kwargs)


def build_optimizer(cfg, chunks, dtype, pg):
    t = cfg.train
    ocfg = OptimizerConfig(
        optimizer="adam" if t.optimizer == "adamw" else "sgd",
        lr=t.lr,
        min_lr=t.min_lr,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        adam_eps=t.adam_eps,
        sgd_momentum=0.0,
        clip_grad=t.clip_grad,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    # Megatron's default exemption (biases and 1-D tensors) widened to megamoe's marked norm
    # parameters: the one rule both engines apply (megamoe.blocks.norms.skips_weight_decay)
    no_decay = ParamKey(with_name_predicate=ParamWithNamePredicate(
        name="megamoe_skips_weight_decay", fn=lambda p, name: skips_weight_decay(name, p)))
    optimizer = get_megatron_optimizer(ocfg, chunks, pg_collection=pg,
                                       config_overrides={no_decay: ParamGroupOverride(wd_mult=0.0)},
                                       use_gloo_process_groups=False)
    return optimizer, build_scheduler(cfg, optimizer)


def build_scheduler(cfg, optimizer) -> OptimizerParamScheduler:
    """Megatron's LR and weight-decay schedule over `optimizer.param_groups` (also the
    DeepSpeed engine's, so the schedule's checkpoint state is the same under both engines)."""
    t = cfg.train
    decay_style = "cosine" if t.lr_schedule == "cosine" else "constant"
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if t.warmup_steps else t.lr,
        max_lr=t.lr,
        min_lr=t.min_lr if decay_style == "cosine" else t.lr,
        lr_warmup_steps=t.warmup_steps,
        lr_decay_steps=max(t.steps, t.warmup_steps + 1),
        lr_decay_style=decay_style,
        start_wd=t.weight_decay,
        end_wd=t.weight_decay,
        wd_incr_steps=t.steps,
        wd_incr_style="constant",
    )


def make_forward_step(engine: MegatronEngine):
    task, device = engine.task, engine.device

    def forward_step(data_iterator, model):
        return task.forward_step(model, next(data_iterator), device, engine.step)

    return forward_step


def _iterators(engine: MegatronEngine, microbatches: list):
    """One iterator per model chunk (the interleaved schedule asks each chunk for its data)."""
    n = len(engine.chunks)
    return [iter(microbatches) for _ in range(n)] if n > 1 else iter(microbatches)


def run_forward_backward(engine: MegatronEngine, microbatches: list, forward_only: bool = False) -> dict:
    """Forward (+backward) over this rank's micro-batches; returns the summed stats of the
    task's `stat_names` (loss sum, units, and what else the task counts; last PP stage only,
    other stages return zeros)."""
    fb = get_forward_backward_func()
    extra = {}
    if engine.dims.pipeline > 1:
        extra["p2p_communicator"] = P2PCommunicator(pp_group=engine.pg.pp, config=engine.tconfig)
    losses = fb(
        forward_step_func=make_forward_step(engine),
        data_iterator=_iterators(engine, microbatches),
        model=engine.chunks,
        num_microbatches=len(microbatches),
        seq_length=engine.task.seq_length,
        micro_batch_size=engine.task.micro_batch_size(microbatches[0]),
        forward_only=forward_only,
        pg_collection=engine.pg,
        **extra,
    )
    names = getattr(engine.task, "stat_names", ("loss_sum", "units"))
    total = torch.zeros(len(names))
    for item in losses:
        total += item["loss"].detach().float().cpu()
    return {name: value.item() for name, value in zip(names, total)}


def optimizer_step(engine: MegatronEngine) -> dict:
    lr = engine.optimizer.param_groups[0]["lr"]
    ok, grad_norm, _ = engine.optimizer.step()
    engine.after_step()
    engine.scheduler.step(increment=1)
    engine.step += 1
    return {"grad_norm": float(grad_norm) if grad_norm is not None else 0.0, "lr": lr,
            "update_ok": bool(ok)}


def train_step(engine: MegatronEngine, microbatches: list) -> dict:
    return engine.train_step(microbatches)
