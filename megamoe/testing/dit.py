"""Test configs and pool tasks of the `dit` family: the tiny DiT-MoE the parity, checkpoint
and model tests share, and what they compare besides megamoe.testing.parity's (the EMA)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.testing.parity import parity_task

TINY_DIT = [
    "model.family=dit", "data.kind=shapes", "data.image_size=16", "data.num_classes=6",
    "model.dit.patch_size=4", "model.dit.ema_decay=0.9", "model.dit.class_dropout=0.25",
    "model.dit.frequency_embedding_size=32",
    "model.num_layers=4", "model.hidden_size=32", "model.ffn_hidden_size=64",
    "model.num_attention_heads=4", "model.moe.num_experts=4", "model.moe.topk=2",
    "model.moe.ffn_hidden_size=48", "model.moe.layer_freq=[0,1,0,1]",
    "model.moe.router=dit_moe", "model.moe.shared_expert_ffn_hidden_size=32",
    "model.moe.aux_loss_coeff=0.01", "model.moe.z_loss_coeff=0",
    "train.micro_batch_size=2", "train.global_batch_size=8",
    "train.optimizer=sgd", "train.lr=0.1", "train.min_lr=0.1", "train.lr_schedule=constant",
    "train.warmup_steps=0", "train.weight_decay=0.0", "train.clip_grad=0.5",
    "train.precision=fp32", "run.tensorboard=false", "run.progress=false",
]
DENSE = ["model.moe.num_experts=0", "model.moe.router=topk",
         "model.moe.shared_expert_ffn_hidden_size=0"]


@torch.no_grad()
def warm_start(engine, std: float = 0.05, seed: int = 11) -> None:
    """Every adaLN-Zero tensor (block and final modulations, final projection) filled with
    values drawn from its global key, in every layout alike, and the EMA restarted from there.
    From the zero start the conditioning has no effect and the embedders get no gradient at
    step 1, so a parity check from there would not see them."""
    from megamoe.models.global_view import parameter_shards

    for sh in parameter_shards(engine.modules):
        if "adaln_zero" not in sh.key:
            continue
        p = sh.prepend_axis_num
        shape = tuple(sh.global_shape[p:])
        g = torch.Generator().manual_seed(seed + sum(map(ord, f"{sh.key}{sh.global_offset[:p]}")))
        values = torch.randn(shape, generator=g) * std
        index = tuple(slice(o, o + n) for o, n in zip(sh.global_offset[p:], sh.local_shape))
        sh.data.copy_(values[index].reshape(sh.data.shape))
    for chunk in engine.modules:
        chunk.ema.reset()


def dit_parity_task(overrides=(), steps: int = 3, reference_dp=None, perturb=False):
    """`parity_task` for the dit family: TINY_DIT + `overrides` on shapes images, from the warm
    start; `perturb` (True: one expert; or a function of the engine) after it."""
    from megamoe.testing.parity import perturb_one_expert

    def start(engine):
        warm_start(engine)
        if perturb:
            (perturb if callable(perturb) else perturb_one_expert)(engine)
        return True

    return parity_task([*TINY_DIT, *overrides], steps, reference_dp, start)


def perturb_embedder(engine, scale: float = 1e-2) -> bool:
    """A negative control for the replicated embedders: the timestep MLP perturbed on the last
    rank only (a pipeline replica that drifts from the others)."""
    if dist.get_rank() == dist.get_world_size() - 1:
        with torch.no_grad():
            w = engine.modules[-1].t_embedder.mlp_in.weight
            g = torch.Generator().manual_seed(97)
            w.add_(torch.randn(w.shape, generator=g) * scale)
    return True


def _with_ema(engine, losses):
    """(losses, parameters, EMA) gathered on rank 0, None elsewhere."""
    from megamoe.models.dit.ema import ema_weights
    from megamoe.models.global_view import gather_global

    params = gather_global(engine.modules)
    with ema_weights(engine.modules):
        ema = gather_global(engine.modules)
    return (losses, params, ema) if dist.get_rank() == 0 else None


def straight_with_ema(overrides, steps: int):
    """megamoe.testing.checkpointing.straight, with the EMA."""
    from megamoe.testing.checkpointing import _engine, _steps

    engine = _engine(overrides)
    return _with_ema(engine, _steps(engine, 0, steps))


def continue_with_ema(overrides, root: str, start: int, steps: int):
    """megamoe.testing.checkpointing.load_and_continue, with the EMA."""
    from megamoe.checkpoint.load import load_checkpoint, resolve
    from megamoe.testing.checkpointing import _engine, _steps

    engine = _engine(overrides)
    load_checkpoint(engine, resolve(root, log=lambda *_: None))
    assert engine.step == start
    return _with_ema(engine, _steps(engine, start, start + steps))
