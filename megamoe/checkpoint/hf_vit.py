"""Hugging Face export and import of the `vit` family (model_type "megamoe_vit").

transformers has no MoE vision transformer, so the folder carries megamoe's modeling code
(`hf_remote/configuration_megamoe_vit.py`, `modeling_megamoe_vit.py`, and the router families'
`routers_megamoe.py`), named by `auto_map`:
    AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
returns logits [B, K] for uint8 or [-1, 1] float pixel values [B, 3, H, W], computing what
megamoe's eval-mode model computes.

On disk (HF naming in the style of transformers' ViT):
- `vit.embeddings.patch_embedding.{weight [D, 3·P·P], bias}` (patches flattened (c, dy, dx),
  megamoe.blocks.embeddings.patchify), `vit.embeddings.cls_token` [1, D] with `pool: cls`,
  `vit.embeddings.position_embeddings` [S, D] when learned;
- per layer i `vit.encoder.layer.{i}.`: `layernorm_before`, `attention.{q,k,v,o}_proj`
  (weights and biases; Megatron's per-group fused qkv split as hf_layout does for decoders),
  `layernorm_after`, then `mlp.fc1`/`mlp.fc2` (dense) or `mlp.gate.weight` [E, D] (+ every
  other router tensor or persistent buffer as `mlp.gate.<name>`), fused experts
  `mlp.experts.fc1_weight` [E, F, D], `fc1_bias` [E, F], `fc2_weight` [E, D, F], `fc2_bias`
  [E, D], a shared expert as `mlp.shared_expert.fc{1,2}`;
- `vit.layernorm` (final), `classifier.{weight, bias}`.
"""

from __future__ import annotations

import os

from megamoe.checkpoint.global_load import stack_layers, unstack_layers
from megamoe.checkpoint.hf_layout import DecoderShape, TensorPool, fuse_qkv, split_qkv

MODEL_TYPE = "megamoe_vit"
CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")
CODE_FILES = ("configuration_megamoe_vit.py", "modeling_megamoe_vit.py", "routers_megamoe.py")
AUTO_MAP = {"AutoConfig": "configuration_megamoe_vit.MegamoeViTConfig",
            "AutoModelForImageClassification":
                "modeling_megamoe_vit.MegamoeViTForImageClassification"}
LINEAR = ("weight", "bias")


def problems(cfg) -> list[str]:
    """What the remote code cannot express (field: reason)."""
    moe, v = cfg.model.moe, cfg.model.vit
    if moe.num_experts and moe.router == "expert_choice" \
            and moe.expert_choice.selection_group == "sequence":
        return ["model.moe.expert_choice.selection_group: 'sequence'; the remote code selects "
                "over all tokens of a call"]
    clip_only = [(v.pre_norm, "model.vit.pre_norm: true"),
                 (not v.patch_bias, "model.vit.patch_bias: false"),
                 (v.activation != "gelu", f"model.vit.activation: {v.activation!r}")]
    return [f"{field}; the remote code has CLIP's options only through "
            f"megamoe.checkpoint.hf_clip" for bad, field in clip_only if bad]


def _shape(cfg) -> DecoderShape:
    return DecoderShape.from_config(cfg)


def hf_config(cfg, num_classes: int) -> dict:
    from megamoe.checkpoint.hf_fields import renormalize
    from megamoe.checkpoint.hf_megamoe import capacity_fields, router_fields
    from megamoe.config.vision import image_tokens
    from megamoe.specs.gpt_moe import moe_layer_pattern

    m, moe, v, s = cfg.model, cfg.model.moe, cfg.model.vit, _shape(cfg)
    fields = router_fields(cfg)
    fields.pop("routing_context")
    return {
        "architectures": ["MegamoeViTForImageClassification"], "model_type": MODEL_TYPE,
        "auto_map": AUTO_MAP, "image_size": cfg.data.image_size, "patch_size": v.patch_size,
        "num_channels": 3, "pool": v.pool, "position_embedding": v.position_embedding,
        "num_tokens": image_tokens(cfg), "num_labels": num_classes,
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers, "num_attention_heads": s.heads,
        "num_key_value_heads": s.groups, "head_dim": s.head_dim, "hidden_act": "gelu",
        "layer_norm_eps": m.norm_epsilon, "initializer_range": m.init_method_std,
        "moe_layers": [int(x) for x in moe_layer_pattern(m.num_layers, moe.layer_freq,
                                                         moe.num_experts)],
        "num_experts": moe.num_experts, "moe_intermediate_size": moe.ffn_hidden_size,
        "router": moe.router, "num_experts_per_tok": moe.topk,
        "score_function": moe.score_function, "norm_topk_prob": renormalize(moe),
        "shared_expert_intermediate_size": moe.shared_expert_ffn_hidden_size,
        "dtype": "float32", **fields, **capacity_fields(moe),
    }


LAYERS = ("decoder.layers.", "vit.encoder.layer.")     # (megamoe, HF) prefix of layer i


def _layer_names(s: DecoderShape, i: int, is_moe: bool, prefixes=LAYERS
                 ) -> list[tuple[str, str]]:
    """(megamoe key, HF key) of layer i's tensors other than the fused qkv and the router's
    own (which need a split or a listing): the one table both directions read."""
    p, q = f"{prefixes[0]}{i}.", f"{prefixes[1]}{i}."
    pairs = [("input_layernorm", "layernorm_before"), ("pre_mlp_layernorm", "layernorm_after"),
             ("self_attention.linear_proj", "attention.o_proj")]
    if not is_moe:
        pairs += [("mlp.linear_fc1", "mlp.fc1"), ("mlp.linear_fc2", "mlp.fc2")]
    elif s.shared_expert:
        pairs += [("mlp.shared_experts.linear_fc1", "mlp.shared_expert.fc1"),
                  ("mlp.shared_experts.linear_fc2", "mlp.shared_expert.fc2")]
    out = [(f"{p}{ours}.{kind}", f"{q}{theirs}.{kind}") for ours, theirs in pairs
           for kind in LINEAR]
    if is_moe:
        out += [(f"{p}mlp.experts.experts.linear_{fc}.{kind}", f"{q}mlp.experts.{fc}_{kind}")
                for fc in ("fc1", "fc2") for kind in LINEAR]
    return out


GLOBAL_NAMES = [("embedding.proj.weight", "vit.embeddings.patch_embedding.weight"),
                ("embedding.proj.bias", "vit.embeddings.patch_embedding.bias"),
                *[(f"decoder.final_layernorm.{k}", f"vit.layernorm.{k}") for k in LINEAR],
                *[(f"head.{k}", f"classifier.{k}") for k in LINEAR]]
OPTIONAL_NAMES = [("embedding.class_token", "vit.embeddings.cls_token"),
                  ("embedding.position_embeddings", "vit.embeddings.position_embeddings")]
ROUTER = ("mlp.router.", "mlp.gate.")


def _convert(src: TensorPool, s: DecoderShape, forward: bool) -> dict:
    """Every tensor of `src` under the other side's name (`forward`: megamoe → HF)."""
    def pair(a, b):
        return (a, b) if forward else (b, a)

    out = {}
    for names in (GLOBAL_NAMES, OPTIONAL_NAMES):
        for ours, theirs in names:
            key, to = pair(ours, theirs)
            if names is GLOBAL_NAMES or src.has(key):
                out[to] = src.take(key)
    out.update(convert_layers(src, s, forward))
    src.expect_empty("exported" if forward else "imported")
    return out


def convert_layers(src: TensorPool, s: DecoderShape, forward: bool, prefixes=LAYERS) -> dict:
    """Every encoder layer's tensors taken from `src` under the other side's name (`forward`:
    megamoe → HF), layer i under `prefixes` (megamoe's, HF's) + "{i}." (the vlm family's
    remote code puts the layers elsewhere: hf_vlm)."""
    out = {}
    for i, is_moe in enumerate(s.moe_layers):
        p, q = f"{prefixes[0]}{i}.", f"{prefixes[1]}{i}."
        for ours, theirs in _layer_names(s, i, is_moe, prefixes):
            key, to = (ours, theirs) if forward else (theirs, ours)
            out[to] = src.take(key)
        for kind in LINEAR:
            qkv_key = f"{p}self_attention.linear_qkv.{kind}"
            hf_keys = [f"{q}attention.{proj}_proj.{kind}" for proj in "qkv"]
            if forward:
                out.update(zip(hf_keys, split_qkv(src.take(qkv_key), s)))
            else:
                out[qkv_key] = fuse_qkv(*(src.take(k) for k in hf_keys), s, src.where)
        if is_moe:
            a, b = (p + ROUTER[0], q + ROUTER[1]) if forward else (q + ROUTER[1], p + ROUTER[0])
            for name in src.names_under(a):
                out[b + name] = src.take(a + name)
    return out


def to_hf(tensors: dict, cfg) -> dict:
    """megamoe's global tensors (either layer layout) → the folder's tensors."""
    return _convert(TensorPool(unstack_layers(tensors), "megamoe tensors"), _shape(cfg), True)


def write_code(out_dir: str) -> None:
    from megamoe.checkpoint.hf_megamoe import write_code as copy_code

    copy_code(out_dir, CODE_FILES)


def read_config(hf_dir: str):
    from megamoe.checkpoint.hf_megamoe import read_config as read
    from megamoe.checkpoint.hf_remote.configuration_megamoe_vit import MegamoeViTConfig

    return read(hf_dir, MegamoeViTConfig)


def from_hf_config(c, where: str) -> tuple[list[str], DecoderShape]:
    """megamoe overrides (architecture and image fields) and the tensor layout of a
    MegamoeViTConfig."""
    from megamoe.checkpoint.hf_fields import layer_freq_override, renormalize_overrides
    from megamoe.checkpoint.hf_megamoe import RAW_WEIGHTS, capacity_overrides, router_overrides

    moe_layers = tuple(bool(x) for x in c.moe_layers)
    if len(moe_layers) != c.num_hidden_layers:
        raise ValueError(f"{where}: moe_layers has {len(moe_layers)} entries, "
                         f"num_hidden_layers is {c.num_hidden_layers}")
    overrides = [
        "model.family=vit", "data.kind=shapes", f"data.image_size={c.image_size}",
        f"data.num_classes={c.num_labels}", f"model.vit.patch_size={c.patch_size}",
        f"model.vit.pool={c.pool}", f"model.vit.position_embedding={c.position_embedding}",
        f"model.num_layers={c.num_hidden_layers}", f"model.hidden_size={c.hidden_size}",
        f"model.ffn_hidden_size={c.intermediate_size}",
        f"model.num_attention_heads={c.num_attention_heads}",
        f"model.num_query_groups={c.num_key_value_heads}", f"model.kv_channels={c.head_dim}",
        f"model.norm_epsilon={float(c.layer_norm_eps)!r}",
        f"model.init_method_std={float(c.initializer_range)!r}",
        f"model.moe.num_experts={c.num_experts}",
        f"model.moe.ffn_hidden_size={c.moe_intermediate_size}",
        f"model.moe.topk={c.num_experts_per_tok}", f"model.moe.router={c.router}",
        f"model.moe.score_function={c.score_function}",
        *renormalize_overrides(c.norm_topk_prob or c.router in RAW_WEIGHTS, where),
        f"model.moe.shared_expert_ffn_hidden_size={c.shared_expert_intermediate_size}",
        layer_freq_override(moe_layers), *capacity_overrides(c), *router_overrides(c),
    ]
    shape = DecoderShape(moe_layers=moe_layers, num_experts=c.num_experts,
                         heads=c.num_attention_heads, groups=c.num_key_value_heads,
                         head_dim=c.head_dim, qkv_bias=True, qk_norm=False,
                         shared_expert=bool(c.shared_expert_intermediate_size),
                         shared_gate=False, tied=False)
    return overrides, shape


def from_hf(hf_tensors: dict, s: DecoderShape, where: str) -> dict:
    """The folder's tensors → megamoe's global tensors (Megatron's layer layout)."""
    out = _convert(TensorPool(hf_tensors, where), s, False)
    return stack_layers(out) if len(set(s.moe_layers)) == 1 else out
