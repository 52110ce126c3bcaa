"""The Megatron engine: model chunks wrapped in Megatron DDP, Megatron's optimizer (optionally
distributed) and LR schedule, and one `train_step` over Megatron's pipeline schedules.

Loss is the mean over every label token of the global batch (`calculate_per_token_loss`):
micro-batches return loss sums and token counts, and `finalize_model_grads` divides by the
global token count, so any DP size / micro-batch split gives the same gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, partial

import torch

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

from megamoe.models.init import init_global
from megamoe.models.lm import build_lm, transformer_config
from megamoe.data.synthetic_context import context_fields
from megamoe.moe.routing_context import RoutingContext
from megamoe.mor.decoder import mor_after_step
from megamoe.parallel import ParallelDims, build_grids, seed_rng


@dataclass
class Engine:
    cfg: object
    dims: ParallelDims
    pg: object
    tconfig: object
    chunks: list            # DDP-wrapped model chunks (or bare chunks when no optimizer)
    optimizer: object = None
    scheduler: object = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    step: int = 0
    consumed_samples: int = 0
    vocab_size: int = 0     # the tokenizer's; the model's rows are padded_vocab_size

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and output layer (megamoe.models.vocab)."""
        return self.modules[0].vocab_size

    @property
    def modules(self) -> list:
        """The unwrapped GPTModel chunks."""
        return [getattr(c, "module", c) for c in self.chunks]

    @cached_property
    def moe_layers(self) -> list:
        """This rank's megamoe MoE layers (found once: the per-step readers and the end-of-step
        router update walk this list, not the module tree)."""
        from megamoe.models.lm import moe_layers

        return moe_layers(self.modules)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def build_engine(cfg, vocab_size: int, device: torch.device, *, with_optimizer: bool = True,
                 ddp: bool = True) -> Engine:
    dims = ParallelDims.from_config(cfg.parallel)
    pg = build_grids(dims).lm
    seed_rng(cfg.run.seed)
    dtype = resolve_dtype(cfg.train.precision, device)
    tconfig = transformer_config(cfg, dims, sequence_parallel=dims.sequence_parallel, dtype=dtype)
    chunks = build_lm(cfg, tconfig, pg, vocab_size)
    for c in chunks:
        c.to(device)
    init_global(chunks, cfg.run.seed, cfg.model.init_method_std, cfg.model.num_layers)
    if ddp:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=False,
            use_distributed_optimizer=cfg.parallel.distributed_optimizer,
            check_for_nan_in_grad=False,
        )
        chunks = [
            DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=c,
                                    disable_bucketing=i > 0, pg_collection=pg)
            for i, c in enumerate(chunks)
        ]
        tconfig.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
        tconfig.finalize_model_grads_func = partial(finalize_model_grads, pg_collection=pg)
    engine = Engine(cfg=cfg, dims=dims, pg=pg, tconfig=tconfig, chunks=chunks, device=device,
                    vocab_size=vocab_size)
    if with_optimizer:
        engine.optimizer, engine.scheduler = build_optimizer(cfg, chunks, dtype, pg)
    return engine


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
    optimizer = get_megatron_optimizer(ocfg, chunks, pg_collection=pg,
                                       use_gloo_process_groups=False)
    decay_style = "cosine" if t.lr_schedule == "cosine" else "constant"
    scheduler = OptimizerParamScheduler(
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
    return optimizer, scheduler


def _loss_func(loss_mask_BS: torch.Tensor, output_BS: torch.Tensor):
    """Sum of the token losses and the token count; Megatron divides by the global count."""
    mask = loss_mask_BS.reshape(-1).float()
    loss_sum = (output_BS.reshape(-1).float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), mask.sum()])}


def make_forward_step(engine: Engine):
    slot = engine.modules[0].routing_context_slot
    device = engine.device

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens = batch["tokens"].to(device)
        fields = {"modality_ids_BS": batch.get("modality_ids"),
                  "sequence_ids_BS": batch.get("sequence_ids"), "labels_BS": batch["labels"]}
        fields.update(context_fields(batch["tokens"], engine.cfg.data, engine.cfg.model.hidden_size))
        slot.set(RoutingContext(**fields))
        output = model(tokens, batch["position_ids"].to(device), None,
                       labels=batch["labels"].to(device))
        return output, partial(_loss_func, batch["loss_mask"].to(device))

    return forward_step


def _iterators(engine: Engine, microbatches: list):
    """One iterator per model chunk (the interleaved schedule asks each chunk for its data)."""
    n = len(engine.chunks)
    return [iter(microbatches) for _ in range(n)] if n > 1 else iter(microbatches)


def run_forward_backward(engine: Engine, microbatches: list, forward_only: bool = False) -> dict:
    """Forward (+backward) over this rank's micro-batches; returns summed loss stats (last PP
    stage only; other stages return zeros)."""
    fb = get_forward_backward_func()
    S = engine.cfg.model.seq_length
    extra = {}
    if engine.dims.pipeline > 1:
        extra["p2p_communicator"] = P2PCommunicator(pp_group=engine.pg.pp, config=engine.tconfig)
    losses = fb(
        forward_step_func=make_forward_step(engine),
        data_iterator=_iterators(engine, microbatches),
        model=engine.chunks,
        num_microbatches=len(microbatches),
        seq_length=S,
        micro_batch_size=microbatches[0]["tokens"].shape[0],
        forward_only=forward_only,
        pg_collection=engine.pg,
        **extra,
    )
    total = torch.zeros(2)
    for item in losses:
        total += item["lm loss"].detach().float().cpu()
    return {"loss_sum": total[0].item(), "tokens": total[1].item()}


def optimizer_step(engine: Engine) -> dict:
    lr = engine.optimizer.param_groups[0]["lr"]
    ok, grad_norm, _ = engine.optimizer.step()
    for layer in engine.moe_layers:
        layer.router.after_step()
    mor_after_step(engine.modules, engine.pg.dp)     # MoR token-choice loss-free bias
    engine.scheduler.step(increment=1)
    engine.step += 1
    return {"grad_norm": float(grad_norm) if grad_norm is not None else 0.0, "lr": lr,
            "update_ok": bool(ok)}


def train_step(engine: Engine, microbatches: list) -> dict:
    for c in engine.chunks:
        c.zero_grad_buffer()
    engine.optimizer.zero_grad()
    stats = run_forward_backward(engine, microbatches)
    stats.update(optimizer_step(engine))
    return stats
