"""The `vit` family: a ViT / V-MoE image classifier (megamoe.models.vit.model) trained on the
shapes images (megamoe.data.shapes), one loss per image.

Bidirectional: causality rules do not apply (no opt-in). Routers that need context an image
classifier does not have (modality ids, timesteps, emotion labels) are refused by name.
"""

from __future__ import annotations

from megamoe.config.errors import fail
from megamoe.models.registry import Family, register

# router families that route image tokens on hidden states and the sample index alone
ROUTERS_FOR_VIT = ("topk", "vmoe", "soft", "expert_choice", "dit_moe", "diffmoe")


def check_vit(cfg) -> None:
    """The config describes a classifier this family can build (one line naming the field)."""
    from megamoe.config.vision import grid_side, num_classes, time_slices, tower_layers

    m, moe = cfg.model, cfg.model.moe
    if cfg.data.kind != "shapes":
        fail("data.kind", f"model.family 'vit' trains on images: set it to 'shapes', got "
             f"{cfg.data.kind!r}")
    if m.mor.enabled:
        fail("model.mor.enabled", "Mixture-of-Recursions is an option of the lm family")
    if m.modality_norm != "none":
        fail("model.modality_norm", "the vit task's images carry no modality ids; set 'none'")
    grid_side(cfg)
    time_slices(cfg)      # model.vit.tubelet_size: 1 (tubelets are for video)
    num_classes(cfg)
    tower_layers(cfg)
    if m.vit.position_embedding == "sincos" and m.hidden_size % 4:
        fail("model.vit.position_embedding", f"'sincos' needs model.hidden_size divisible by "
             f"4, got {m.hidden_size}")
    if moe.num_experts and moe.router not in ROUTERS_FOR_VIT:
        fail("model.moe.router", f"'{moe.router}' does not support the vit task (it needs "
             f"context an image classifier lacks); choose one of {', '.join(ROUTERS_FOR_VIT)}")


def _task(cfg):
    from megamoe.models.vit.task import ViTTask

    return ViTTask(cfg)


def _transformer_config(cfg, dims, *, sequence_parallel: bool, dtype):
    from megamoe.models.vit.model import transformer_config

    return transformer_config(cfg, dims, sequence_parallel=sequence_parallel, dtype=dtype)


def _build(cfg, tconfig, grid, _output_size: int, grids=None) -> list:
    from megamoe.models.vit.model import build_vit

    return build_vit(cfg, tconfig, grid)


def _parameter_counts(cfg, _output_size: int):
    from megamoe.models.vit.accounting import parameter_counts

    return parameter_counts(cfg)


def _flops_per_image(cfg, _output_size: int) -> float:
    from megamoe.models.vit.accounting import flops_per_image

    return flops_per_image(cfg)


def _after_step_hooks(chunks, grid) -> list:
    """The routers' end-of-step updates (V-MoE's noise step, DiffMoE's thresholds)."""
    from megamoe.models.lm.model import moe_layers

    return [layer.router.after_step for layer in moe_layers(chunks)]


def _describe(cfg, _output_size: int) -> dict:
    from megamoe.config.vision import image_tokens, num_classes

    v = cfg.model.vit
    return {"images": f"{cfg.data.image_size}x{cfg.data.image_size}, patch {v.patch_size} -> "
                      f"{image_tokens(cfg)} tokens ({'class token' if v.pool == 'cls' else 'mean pooling'}, "
                      f"{v.position_embedding} positions), {num_classes(cfg)} classes"}


VIT = register(Family(
    name="vit",
    transformer_config=_transformer_config,
    build=_build,
    task=_task,
    parameter_counts=_parameter_counts,
    flops_per_unit=_flops_per_image,
    checks=(check_vit,),
    causal=False,
    unit="image",
    after_step_hooks=_after_step_hooks,
    describe=_describe,
    notes="ViT / V-MoE image classifier (bidirectional; model.vit, data.kind shapes)",
))
