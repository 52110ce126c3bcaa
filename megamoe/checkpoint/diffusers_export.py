"""Export of a `dit` model to a diffusers pipeline folder (`megamoe convert RUN --to diffusers`).

diffusers has no MoE diffusion transformer, so the folder carries megamoe's code, which
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` runs without megamoe
installed (and refuses to run without trust_remote_code):

    model_index.json            _class_name ["pipeline", "MegamoeDiTPipeline"]: pipeline.py
    pipeline.py                 diffusers_remote/pipeline_megamoe_dit.py (megamoe's sampler)
    transformer/config.json     MegamoeDiTTransformer2DModel's arguments
    transformer/modeling_megamoe_dit.py, routers_megamoe.py (hf_remote's, unchanged)
    transformer/diffusion_pytorch_model.safetensors   the EMA weights (+ router buffers)
    scheduler/scheduler_config.json   FlowMatchEulerDiscreteScheduler (shift 1) or
                                      DDPMScheduler (the run's linear β), as megamoe samples

How diffusers 0.42 finds the code (pipelines/pipeline_loading_utils.py): a `_class_name` list
[file, class] whose file lies in the folder selects that custom pipeline class; a component
entry [module, class] whose `<component>/<module>.py` exists is imported from there, its
relative imports (routers_megamoe) copied along into diffusers' module cache. Both go through
`get_cached_module_file`, which raises ValueError for a local code file unless
trust_remote_code=True. The pipeline's `save_pretrained` copies the code into the new folder.

Tensors on disk (fp32): `patch_embed` [D, C·P·P] (patches flattened (c, dy, dx)),
`timestep_embedder.linear_{1,2}`, `class_embedder.weight` [K + 1, D] (last row: null class);
per block `blocks.{i}.`: `adaln_modulation` [6D, D], `attn.{q,k,v,o}_proj` (Megatron's
per-group fused qkv split as hf_layout splits it), then `ffn.fc{1,2}` (dense) or `ffn.gate.<name>`
(every router tensor and persistent buffer, megamoe's `mlp.router.<name>`), fused experts
`ffn.experts.fc1_weight` [E, F, D], `fc1_bias`, `fc2_weight` [E, D, F], `fc2_bias`, the
shared expert `ffn.shared_expert.fc{1,2}.weight`; `final_layer.adaln_modulation` [2D, D] and
`final_layer.proj` [P²·C, D].
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from megamoe.checkpoint.global_load import unstack_layers
from megamoe.checkpoint.hf_layout import DecoderShape, TensorPool, split_qkv

CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "diffusers_remote")
ROUTER_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote",
                           "routers_megamoe.py")
PIPELINE_FILE = "pipeline.py"
MODELING = "modeling_megamoe_dit"
TRANSFORMER_CLASS = "MegamoeDiTTransformer2DModel"
PIPELINE_CLASS = "MegamoeDiTPipeline"
WEIGHTS = "diffusion_pytorch_model.safetensors"
LINEAR = ("weight", "bias")
# expert-choice selection groups the remote code reproduces on one process
EC_GROUPS = ("micro-batch", "sequence")


def problems(cfg) -> list[str]:
    """What the folder's code cannot express (field: reason)."""
    from megamoe.models.dit.family import ROUTERS_FOR_DIT

    m, moe, bad = cfg.model, cfg.model.moe, []
    if m.family != "dit":
        return [f"model.family: {m.family!r}; the diffusers export writes dit models "
                "(`--to hf` exports the others)"]
    if moe.num_experts:
        if moe.router not in ROUTERS_FOR_DIT:
            bad.append(f"model.moe.router: {moe.router!r}; the export runs "
                       f"{', '.join(ROUTERS_FOR_DIT)}")
        if moe.router == "expert_choice" and moe.expert_choice.selection_group not in EC_GROUPS:
            bad.append(f"model.moe.expert_choice.selection_group: "
                       f"{moe.expert_choice.selection_group!r}; the export selects per image "
                       "(sequence) or over the call's images (micro-batch)")
        if moe.fp8.recipe != "none":
            bad.append(f"model.moe.fp8.recipe: {moe.fp8.recipe!r}; the export computes the "
                       "experts in fp32 (set none)")
    return bad


def check(cfg) -> None:
    bad = problems(cfg)
    if bad:
        raise ValueError(f"--to diffusers: {bad[0]}")


def _shape(cfg) -> DecoderShape:
    return DecoderShape.from_config(cfg)


def transformer_config(cfg) -> dict:
    """MegamoeDiTTransformer2DModel's config.json."""
    import diffusers

    from megamoe.checkpoint.hf_fields import renormalize
    from megamoe.checkpoint.hf_megamoe import RAW_WEIGHTS, capacity_fields, router_fields

    m, moe, d, s = cfg.model, cfg.model.moe, cfg.model.dit, _shape(cfg)
    fields = router_fields(cfg)
    return {
        "_class_name": TRANSFORMER_CLASS, "_diffusers_version": diffusers.__version__,
        "sample_size": cfg.data.image_size, "patch_size": d.patch_size, "in_channels": 3,
        "num_classes": cfg.data.num_classes, "hidden_size": m.hidden_size,
        "num_layers": m.num_layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.groups, "head_dim": s.head_dim,
        "intermediate_size": m.ffn_hidden_size,
        "frequency_embedding_size": d.frequency_embedding_size, "norm_eps": m.norm_epsilon,
        "moe_layers": [int(x) for x in s.moe_layers], "num_experts": moe.num_experts,
        "moe_intermediate_size": moe.ffn_hidden_size, "router": moe.router,
        "num_experts_per_tok": moe.topk, "score_function": moe.score_function,
        "norm_topk_prob": bool(renormalize(moe)) and moe.router not in RAW_WEIGHTS,
        "shared_expert_intermediate_size": moe.shared_expert_ffn_hidden_size,
        "router_options": fields["router_options"],
        "loss_free_bias_rate": fields["loss_free_bias_rate"],
        **capacity_fields(moe),
        "expert_choice_per_image": bool(moe.num_experts and moe.router == "expert_choice"
                                        and moe.expert_choice.selection_group == "sequence"),
    }


def make_scheduler(cfg):
    """The scheduler megamoe samples with (megamoe.models.dit.sample.make_scheduler)."""
    from megamoe.models.dit.sample import make_scheduler as megamoe_scheduler

    return megamoe_scheduler(cfg.model.dit, 1)


def _layer_names(i: int, is_moe: bool, shared: bool) -> list[tuple[str, str]]:
    """(megamoe key, diffusers key) of block i's tensors but the fused qkv and the router's."""
    p, q = f"decoder.layers.{i}.", f"blocks.{i}."
    out = [(f"{p}adaln_zero_{k}", f"{q}adaln_modulation.{k}") for k in LINEAR]
    out += [(f"{p}self_attention.linear_proj.{k}", f"{q}attn.o_proj.{k}") for k in LINEAR]
    if not is_moe:
        return out + [(f"{p}mlp.linear_{fc}.{k}", f"{q}ffn.{fc}.{k}")
                      for fc in ("fc1", "fc2") for k in LINEAR]
    out += [(f"{p}mlp.experts.experts.linear_{fc}.{k}", f"{q}ffn.experts.{fc}_{k}")
            for fc in ("fc1", "fc2") for k in LINEAR]
    if shared:
        out += [(f"{p}mlp.shared_experts.linear_{fc}.weight", f"{q}ffn.shared_expert.{fc}.weight")
                for fc in ("fc1", "fc2")]
    return out


GLOBAL_NAMES = [
    *[(f"x_embedder.proj.{k}", f"patch_embed.{k}") for k in LINEAR],
    *[(f"t_embedder.mlp_in.{k}", f"timestep_embedder.linear_1.{k}") for k in LINEAR],
    *[(f"t_embedder.mlp_out.{k}", f"timestep_embedder.linear_2.{k}") for k in LINEAR],
    ("y_embedder.embedding_table.weight", "class_embedder.weight"),
    *[(f"final_layer.adaln_zero_{k}", f"final_layer.adaln_modulation.{k}") for k in LINEAR],
    *[(f"final_layer.adaln_zero_out_{k}", f"final_layer.proj.{k}") for k in LINEAR],
]


def to_diffusers(tensors: dict, cfg) -> dict:
    """megamoe's global tensors (either layer layout; router buffers included) → the
    transformer's state dict (fp32, contiguous)."""
    s = _shape(cfg)
    src = TensorPool(unstack_layers(tensors), "megamoe tensors")
    out = {theirs: src.take(ours) for ours, theirs in GLOBAL_NAMES}
    for i, is_moe in enumerate(s.moe_layers):
        out.update({theirs: src.take(ours)
                    for ours, theirs in _layer_names(i, is_moe, s.shared_expert)})
        for k in LINEAR:
            q, kk, v = split_qkv(src.take(f"decoder.layers.{i}.self_attention.linear_qkv.{k}"), s)
            out.update({f"blocks.{i}.attn.q_proj.{k}": q, f"blocks.{i}.attn.k_proj.{k}": kk,
                        f"blocks.{i}.attn.v_proj.{k}": v})
        if is_moe:
            prefix = f"decoder.layers.{i}.mlp.router."
            for name in src.names_under(prefix):
                out[f"blocks.{i}.ffn.gate.{name}"] = src.take(prefix + name)
    src.expect_empty("not exported")
    return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}


def check_out_dir(out_dir: str, force: bool = False) -> None:
    """ValueError unless `out_dir` is new, empty, an earlier pipeline export (model_index.json)
    or `force`d."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a folder")
    if (os.path.isdir(out_dir) and os.listdir(out_dir) and not force
            and not os.path.isfile(os.path.join(out_dir, "model_index.json"))):
        raise ValueError(f"{out_dir}: exists and is not a diffusers pipeline folder (no "
                         "model_index.json); choose another folder, or pass --force")


def export_diffusers(tensors: dict, cfg, out_dir: str, *, force: bool = False) -> str:
    """Write the pipeline folder of the model `tensors` hold (module docstring)."""
    import diffusers
    from safetensors.torch import save_file

    check(cfg)
    check_out_dir(out_dir, force)
    state = to_diffusers(tensors, cfg)
    transformer_dir = os.path.join(out_dir, "transformer")
    os.makedirs(transformer_dir, exist_ok=True)
    save_file(state, os.path.join(transformer_dir, WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(transformer_dir, "config.json"), "w") as f:
        json.dump(transformer_config(cfg), f, indent=2)
    shutil.copyfile(os.path.join(CODE_DIR, f"{MODELING}.py"),
                    os.path.join(transformer_dir, f"{MODELING}.py"))
    shutil.copyfile(ROUTER_CODE, os.path.join(transformer_dir, os.path.basename(ROUTER_CODE)))
    shutil.copyfile(os.path.join(CODE_DIR, "pipeline_megamoe_dit.py"),
                    os.path.join(out_dir, PIPELINE_FILE))
    scheduler = make_scheduler(cfg)
    scheduler.save_config(os.path.join(out_dir, "scheduler"))
    index = {"_class_name": [PIPELINE_FILE[:-3], PIPELINE_CLASS],
             "_diffusers_version": diffusers.__version__,
             "transformer": [MODELING, TRANSFORMER_CLASS],
             "scheduler": ["diffusers", type(scheduler).__name__]}
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return out_dir


def ema_tensors(chunks) -> dict:
    """The model's global tensors with the EMA weights in place of the trained ones, plus the
    routers' persistent buffers (not averaged)."""
    from megamoe.checkpoint.router_state import gather_router_buffers
    from megamoe.models.dit.ema import ema_weights
    from megamoe.models.global_view import gather_global

    with ema_weights(chunks), torch.no_grad():
        tensors = gather_global(chunks)
    return {**tensors, **gather_router_buffers(chunks)}
