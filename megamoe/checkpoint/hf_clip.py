"""The `vit` encoder as transformers' `CLIPVisionModel` (the vision tower of
`LlavaForConditionalGeneration`), both directions, from one name table.

Why CLIP: LLaVA's export needs a vision tower transformers builds by itself; CLIP's is the one
LLaVA was made with. A megamoe encoder is CLIP-exact when `problems(cfg)` is empty: dense
layers, multi-head attention with head_dim = D / H, a class token with learned positions, the
pre-encoder LayerNorm and a patch projection without bias (megamoe.config.vision). GELU and
quick_gelu are both CLIP `hidden_act`s; LayerNorm eps is `model.norm_epsilon`; attention
scales by head_dim^-0.5 in both.

Two views of the encoder (`tower`):
- a vision tower (megamoe.models.vit.model.build_vision_tower): its k layers become a CLIP of
  k layers, read by LLaVA at `vision_feature_layer: -1` (`llava_vision_fields`). CLIP's
  `post_layernorm` is written as the identity (ones, zeros): LLaVA never reads it and the
  tower has none. Back from a CLIP of L ≥ k layers, layers k+1…L and `post_layernorm` are
  dropped for the same reason.
- the classifier (family `vit`, tower=False): all L layers, the final LayerNorm as
  `post_layernorm` (CLIP's pooled output = the classifier's pooled token), the head left out
  (CLIP's vision model has none; `from_clip` gives no head back).

Tensors (megamoe global key → CLIP key, without `prefix`; LLaVA's is "model.vision_tower."):
`embedding.proj.weight` [D, 3·P·P] ↔ `embeddings.patch_embedding.weight` [D, 3, P, P] (our
patches are flattened (c, dy, dx), the convolution's kernel order), `embedding.class_token`
[1, D] ↔ `embeddings.class_embedding` [D], positions, `embedding.pre_norm` ↔ `pre_layrnorm`;
per layer the two LayerNorms, Megatron's per-group fused qkv split into q/k/v_proj
(megamoe.checkpoint.hf_layout), `linear_proj` ↔ `out_proj`, `linear_fc1/2` ↔ `fc1/2`.

Pixels: megamoe scales uint8 images to x/127.5 − 1; `image_processor_fields` gives the
CLIPImageProcessor settings that compute the same (rescale 1/255, mean = std = 0.5).
"""

from __future__ import annotations

import torch

from megamoe.checkpoint.global_load import stack_layers, unstack_layers
from megamoe.checkpoint.hf_layout import DecoderShape, TensorPool, fuse_qkv, split_qkv

LINEAR = ("weight", "bias")
# (megamoe, CLIP) of tensors that keep their shape; layer i's with "{i}" filled in
GLOBAL_NAMES = [("embedding.position_embeddings", "embeddings.position_embedding.weight"),
                *[(f"embedding.pre_norm.{k}", f"pre_layrnorm.{k}") for k in LINEAR]]
FINAL_NORM = [(f"decoder.final_layernorm.{k}", f"post_layernorm.{k}") for k in LINEAR]
LAYER_NAMES = [(f"decoder.layers.{{i}}.{ours}.{k}", f"encoder.layers.{{i}}.{theirs}.{k}")
               for ours, theirs in (("input_layernorm", "layer_norm1"),
                                    ("pre_mlp_layernorm", "layer_norm2"),
                                    ("self_attention.linear_proj", "self_attn.out_proj"),
                                    ("mlp.linear_fc1", "mlp.fc1"), ("mlp.linear_fc2", "mlp.fc2"))
               for k in LINEAR]
QKV = "decoder.layers.{i}.self_attention.linear_qkv.{k}"
CLIP_QKV = "encoder.layers.{i}.self_attn.{p}_proj.{k}"
PATCH = ("embedding.proj.weight", "embeddings.patch_embedding.weight")
CLASS = ("embedding.class_token", "embeddings.class_embedding")
HEAD = ("head.weight", "head.bias")


def problems(cfg) -> list[str]:
    """Why the encoder `cfg` describes is not CLIP's vision tower (field: reason), in the
    tower's layers; empty when it is."""
    from megamoe.config.vision import tower_layers
    from megamoe.specs.gpt_moe import moe_layer_pattern

    m, moe, v = cfg.model, cfg.model.moe, cfg.model.vit
    out = []
    moe_at = [i for i, is_moe in enumerate(
        moe_layer_pattern(m.num_layers, moe.layer_freq, moe.num_experts)[:tower_layers(cfg)])
        if is_moe]
    if moe_at:
        out.append(f"model.moe.num_experts: {moe.num_experts} experts in encoder layer(s) "
                   f"{', '.join(map(str, moe_at))}; CLIP's layers have dense MLPs")
    if (m.num_query_groups or m.num_attention_heads) != m.num_attention_heads:
        out.append(f"model.num_query_groups: {m.num_query_groups}; CLIP's attention is "
                   f"multi-head ({m.num_attention_heads} key/value heads)")
    if m.kv_channels is not None and m.kv_channels * m.num_attention_heads != m.hidden_size:
        out.append(f"model.kv_channels: {m.kv_channels}; CLIP's head_dim is hidden_size / "
                   f"heads ({m.hidden_size // m.num_attention_heads})")
    if v.pool != "cls":
        out.append(f"model.vit.pool: {v.pool!r}; CLIP has a class token ('cls')")
    if v.position_embedding != "learned":
        out.append(f"model.vit.position_embedding: {v.position_embedding!r}; CLIP's positions "
                   f"are learned")
    if not v.pre_norm:
        out.append("model.vit.pre_norm: false; CLIP normalises the embeddings (pre_layrnorm)")
    if v.patch_bias:
        out.append("model.vit.patch_bias: true; CLIP's patch projection has no bias")
    return out


def _refuse_unless_exact(cfg) -> None:
    bad = problems(cfg)
    if bad:
        raise ValueError("not CLIP-exact: " + "; ".join(bad))


def num_clip_layers(cfg, tower: bool = True) -> int:
    from megamoe.config.vision import tower_layers

    return tower_layers(cfg) if tower else cfg.model.num_layers


def clip_vision_config(cfg, tower: bool = True):
    """transformers' CLIPVisionConfig of the encoder (ValueError naming the field when it is
    not CLIP-exact)."""
    from transformers import CLIPVisionConfig

    _refuse_unless_exact(cfg)
    m, v = cfg.model, cfg.model.vit
    return CLIPVisionConfig(
        hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=num_clip_layers(cfg, tower), num_attention_heads=m.num_attention_heads,
        num_channels=3, image_size=cfg.data.image_size, patch_size=v.patch_size,
        hidden_act=v.activation, layer_norm_eps=m.norm_epsilon, attention_dropout=0.0,
        initializer_range=m.init_method_std)


def llava_vision_fields(cfg) -> dict:
    """LlavaConfig's fields for the exported tower: the last exported layer, the strategy."""
    return {"vision_feature_layer": -1,
            "vision_feature_select_strategy": cfg.model.vit.vision_feature_select_strategy}


def image_processor_fields(cfg) -> dict:
    """CLIPImageProcessor settings mapping uint8 images to megamoe's pixels (x/127.5 − 1) at
    the model's size."""
    size = cfg.data.image_size
    return {"do_resize": True, "size": {"height": size, "width": size},
            "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "do_convert_rgb": True}


def _shape(cfg) -> DecoderShape:
    return DecoderShape.from_config(cfg)


def to_clip(tensors: dict, cfg, *, tower: bool = True, prefix: str = "") -> dict:
    """megamoe's global encoder tensors (either layer layout; `tower`: see the module
    docstring) → CLIPVisionModel's state dict, keys under `prefix`."""
    _refuse_unless_exact(cfg)
    src, s, D = TensorPool(unstack_layers(tensors), "megamoe tensors"), _shape(cfg), \
        cfg.model.hidden_size
    out = {theirs: src.take(ours) for ours, theirs in GLOBAL_NAMES}
    P = cfg.model.vit.patch_size
    out[PATCH[1]] = src.take(PATCH[0]).reshape(D, 3, P, P)
    out[CLASS[1]] = src.take(CLASS[0]).reshape(D)
    for ours, theirs in FINAL_NORM:
        if tower:                   # LLaVA never reads post_layernorm; the tower has none
            out[theirs] = torch.ones(D) if ours.endswith("weight") else torch.zeros(D)
        else:
            out[theirs] = src.take(ours)
    if not tower:
        for key in HEAD:            # CLIP's vision model has no classifier
            src.take(key)
    for i in range(num_clip_layers(cfg, tower)):
        for ours, theirs in LAYER_NAMES:
            out[theirs.format(i=i)] = src.take(ours.format(i=i))
        for k in LINEAR:
            q, kk, v = split_qkv(src.take(QKV.format(i=i, k=k)), s)
            out.update({CLIP_QKV.format(i=i, p=p, k=k): t for p, t in zip("qkv", (q, kk, v))})
    src.expect_empty("not part of CLIP's vision tower")
    return {prefix + k: t.contiguous() for k, t in out.items()}


def from_clip(hf_tensors: dict, cfg, *, tower: bool = True, prefix: str = "",
              where: str = "CLIP tensors") -> dict:
    """CLIPVisionModel's state dict (keys under `prefix`; others ignored) → megamoe's global
    encoder tensors (Megatron's stacked layer layout). `tower`: keep the first
    `tower_layers(cfg)` layers and drop what LLaVA never reads (module docstring)."""
    _refuse_unless_exact(cfg)
    mine = {k[len(prefix):]: t for k, t in hf_tensors.items()
            if k.startswith(prefix) and not k.endswith("position_ids")}
    src, s, D = TensorPool(mine, where), _shape(cfg), cfg.model.hidden_size
    out = {ours: src.take(theirs) for ours, theirs in GLOBAL_NAMES}
    out[PATCH[0]] = src.take(PATCH[1]).reshape(D, -1)
    out[CLASS[0]] = src.take(CLASS[1]).reshape(1, D)
    for ours, theirs in FINAL_NORM:
        if tower:
            src.discard(theirs)
        else:
            out[ours] = src.take(theirs)
    n = num_clip_layers(cfg, tower)
    for i in range(n):
        for ours, theirs in LAYER_NAMES:
            out[ours.format(i=i)] = src.take(theirs.format(i=i))
        for k in LINEAR:
            parts = [src.take(CLIP_QKV.format(i=i, p=p, k=k)) for p in "qkv"]
            out[QKV.format(i=i, k=k)] = fuse_qkv(*parts, s, where)
    if tower:                       # layers after the one LLaVA reads
        for name in src.names_under("encoder.layers."):
            if int(name.split(".", 1)[0]) >= n:
                src.discard("encoder.layers." + name)
    src.expect_empty("not in the megamoe encoder")
    return stack_layers(out)


def vit_overrides(clip_config, *, vision_feature_layer: int = -1,
                  vision_feature_select_strategy: str = "default") -> list[str]:
    """megamoe overrides (model, model.vit, data.image_size) for the encoder a CLIPVisionConfig
    describes, read by LLaVA at `vision_feature_layer`; ValueError naming a field megamoe
    cannot take."""
    c = clip_config
    if c.num_channels != 3:
        raise ValueError(f"num_channels: {c.num_channels}; megamoe's images have 3 channels")
    if c.hidden_act not in ("gelu", "quick_gelu"):
        raise ValueError(f"hidden_act: {c.hidden_act!r}; megamoe's encoder has gelu or "
                         f"quick_gelu")
    return [f"data.image_size={c.image_size}", f"model.vit.patch_size={c.patch_size}",
            f"model.num_layers={c.num_hidden_layers}", f"model.hidden_size={c.hidden_size}",
            f"model.ffn_hidden_size={c.intermediate_size}",
            f"model.num_attention_heads={c.num_attention_heads}",
            f"model.num_query_groups={c.num_attention_heads}",
            f"model.kv_channels={c.hidden_size // c.num_attention_heads}",
            f"model.norm_epsilon={float(c.layer_norm_eps)!r}",
            f"model.init_method_std={float(c.initializer_range)!r}",
            "model.moe.num_experts=0", "model.moe.layer_freq=1", "model.vit.pool=cls",
            "model.vit.position_embedding=learned", "model.vit.pre_norm=true",
            "model.vit.patch_bias=false", f"model.vit.activation={c.hidden_act}",
            f"model.vit.vision_feature_layer={vision_feature_layer}",
            f"model.vit.vision_feature_select_strategy={vision_feature_select_strategy}"]
