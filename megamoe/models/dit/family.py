"""The `dit` family: a class-conditional diffusion transformer (DiT, DiT-MoE; papers.md §6–§8)
on the shapes images (megamoe.models.dit.model), trained with rectified flow or DDPM
(megamoe.models.dit.objective), one loss per image, EMA weights kept for sampling.

Bidirectional: causality rules do not apply. The routers a DiT may use are those that route
image tokens on hidden states, the sample index and the conditioning c (`timestep_emb_BD`):
`ROUTERS_FOR_DIT`; Race's PLR head predicts the per-token diffusion target the task puts in
the context. A router that needs modality ids is refused by name.
"""

from __future__ import annotations

from megamoe.config.errors import fail
from megamoe.models.registry import Family, register

# router families that route image tokens on hidden states, the sample index and the
# conditioning c; another family's router joins by adding its key here
ROUTERS_FOR_DIT = ("topk", "dit_moe", "diff_moe", "diffmoe", "expert_choice", "race")


def check_dit(cfg) -> None:
    """The config describes a DiT this family can build (one line naming the field)."""
    from megamoe.config.diffusion import dit_grid_side

    m, moe = cfg.model, cfg.model.moe
    if cfg.data.kind != "shapes":
        fail("data.kind", f"model.family 'dit' trains on images: set it to 'shapes', got "
             f"{cfg.data.kind!r}")
    dit_grid_side(cfg)
    if m.hidden_size % 4:
        fail("model.hidden_size", f"{m.hidden_size}: the dit family's fixed 2-D sin-cos "
             "positions need a multiple of 4")
    if m.mor.enabled:
        fail("model.mor.enabled", "Mixture-of-Recursions is an option of the lm family")
    if m.modality_norm != "none":
        fail("model.modality_norm", "the dit blocks' norms are adaLN-Zero; set 'none'")
    if m.recompute_granularity is not None:
        fail("model.recompute_granularity", "activation recompute is not supported by the dit "
             "family yet (its blocks read the conditioning c, whose graph a recomputed layer "
             "would traverse once per layer); leave it null")
    if cfg.train.engine != "megatron":
        fail("train.engine", f"{cfg.train.engine!r}: the dit family trains on the megatron "
             "engine (its EMA and pipeline embedder sync are built there)")
    if moe.num_experts and moe.router not in ROUTERS_FOR_DIT:
        fail("model.moe.router", f"'{moe.router}' does not support the dit task (it needs "
             f"context a DiT lacks); choose one of {', '.join(ROUTERS_FOR_DIT)}")
    if moe.num_experts and cfg.parallel.expert_tensor_size > 1:
        fail("parallel.expert_tensor", f"{cfg.parallel.expert_tensor_size}: Megatron's biased "
             "experts (DiT's) need expert tensor parallelism 1; set parallel.expert_tensor: 1")


def _task(cfg):
    from megamoe.models.dit.task import DiTTask

    return DiTTask(cfg)


def _transformer_config(cfg, dims, *, sequence_parallel: bool, dtype):
    from megamoe.models.dit.model import transformer_config

    return transformer_config(cfg, dims, sequence_parallel=sequence_parallel, dtype=dtype)


def _build(cfg, tconfig, grid, num_classes: int, grids=None) -> list:
    from megamoe.models.dit.model import build_dit

    return build_dit(cfg, tconfig, grid, num_classes)


def _parameter_counts(cfg, _output_size: int):
    from megamoe.models.dit.accounting import parameter_counts

    return parameter_counts(cfg)


def _flops_per_image(cfg, _output_size: int) -> float:
    from megamoe.models.dit.accounting import flops_per_image

    return flops_per_image(cfg)


def _after_step_hooks(chunks, grid) -> list:
    """The routers' end-of-step updates, then the EMA of the weights just stepped."""
    from megamoe.models.dit.ema import ema_update_hook
    from megamoe.models.lm.model import moe_layers

    return [layer.router.after_step for layer in moe_layers(chunks)] + [ema_update_hook(chunks)]


def _grad_sync(chunks, grids):
    from megamoe.models.dit.model import embedder_grad_sync

    return embedder_grad_sync(chunks, grids)


def _describe(cfg, _output_size: int) -> dict:
    from megamoe.config.diffusion import dit_tokens

    d = cfg.model.dit
    return {"images": f"{cfg.data.image_size}x{cfg.data.image_size}, patch {d.patch_size} -> "
                      f"{dit_tokens(cfg)} tokens, {cfg.data.num_classes} classes + null "
                      f"(drop {d.class_dropout})",
            "diffusion": f"{d.objective}, EMA {d.ema_decay}"}


DIT = register(Family(
    name="dit",
    transformer_config=_transformer_config,
    build=_build,
    task=_task,
    parameter_counts=_parameter_counts,
    flops_per_unit=_flops_per_image,
    checks=(check_dit,),
    causal=False,
    unit="image",
    after_step_hooks=_after_step_hooks,
    describe=_describe,
    grad_sync=_grad_sync,
    notes="class-conditional diffusion transformer, DiT / DiT-MoE (bidirectional; model.dit, "
          "data.kind shapes)",
))
