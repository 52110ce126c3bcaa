"""Hugging Face export and import of the `vlm` family through megamoe's remote code
(model_type "megamoe_vlm"), for the models transformers' LLaVA cannot express (hf_llava):
pixel shuffle, a connector of another width, a vision tower that is not CLIP's (mean pooling,
sin-cos positions, a biased patch projection, no pre-norm), and every LM megamoe's remote LM
code runs (all router families in eval-mode routing, capacity dropping, shared experts,
QK-norm, MoR). The folder carries `hf_remote/configuration_megamoe_vlm.py` and
`modeling_megamoe_vlm.py` with the LM's and the ViT's remote code they reuse:
    AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
returns logits [B, S, V] for input_ids with `<image>` placeholders and pixel_values (uint8,
or float in [−1, 1]); the LM's routers get modality ids 1 at the placeholders, 0 on text.

Not expressed (refused naming the field): what the remote LM code cannot run
(hf_megamoe.problems: modality norms, expert choice per sequence, unknown MoR options), and
MoE layers in the encoder whose router needs a routing context the vision code does not pass
(modality ids, timesteps). Dropped: the contrastive head (training only; hf_llava).

On disk (LLaVA's layout; the tower in the ViT remote code's naming, hf_vit):
- `model.vision_tower.embeddings.patch_embedding.weight` [E, 3·P·P] (+ `.bias` with
  `model.vit.patch_bias`), `.cls_token` [1, E] with `pool: cls`, `.position_embeddings` when
  learned, `.pre_layernorm.{weight,bias}` with `model.vit.pre_norm`;
  `model.vision_tower.encoder.layer.{i}.…` as hf_vit's `vit.encoder.layer.{i}.…`;
- `model.multi_modal_projector.linear_{1,2}.{weight,bias}`;
- `model.language_model.…` as the lm family's remote-code export under `model.…`, and
  `lm_head.weight` (untied).
"""

from __future__ import annotations

import dataclasses

from megamoe.checkpoint import hf_layout, hf_llava, hf_megamoe, hf_vit
from megamoe.checkpoint.global_load import stack_layers, unstack_layers
from megamoe.checkpoint.hf_layout import DecoderShape, TensorPool

MODEL_TYPE = "megamoe_vlm"
CODE_FILES = ("configuration_megamoe_vlm.py", "modeling_megamoe_vlm.py",
              *hf_megamoe.CODE_FILES, "configuration_megamoe_vit.py", "modeling_megamoe_vit.py")
AUTO_MAP = {"AutoConfig": "configuration_megamoe_vlm.MegamoeVLMConfig",
            "AutoModelForImageTextToText":
                "modeling_megamoe_vlm.MegamoeVLMForConditionalGeneration"}
TOWER = ("decoder.layers.", hf_llava.VISION + "encoder.layer.")
EMBEDDINGS = [("embedding.proj.weight", "embeddings.patch_embedding.weight"),
              ("embedding.proj.bias", "embeddings.patch_embedding.bias"),
              ("embedding.class_token", "embeddings.cls_token"),
              ("embedding.position_embeddings", "embeddings.position_embeddings"),
              ("embedding.pre_norm.weight", "embeddings.pre_layernorm.weight"),
              ("embedding.pre_norm.bias", "embeddings.pre_layernorm.bias")]
CONTEXT_ROUTERS = ("modality", "diff_moe")    # routers that read modality ids / timesteps


def problems(cfg) -> list[str]:
    """What the remote code cannot express (field: reason)."""
    moe, bad = cfg.model.moe, hf_megamoe.problems(cfg)
    if cfg.model.vlm.encoder_moe_layer_freq is not None and moe.router in CONTEXT_ROUTERS:
        bad.append(f"model.moe.router: {moe.router!r} in the encoder's MoE layers "
                   "(model.vlm.encoder_moe_layer_freq); the remote vision tower routes without "
                   "modality ids or timesteps")
    return bad


def _tower_shape(cfg) -> DecoderShape:
    from megamoe.config.vision import tower_layers

    enc = hf_llava.encoder_cfg(cfg)
    s = DecoderShape.from_config(enc)
    return dataclasses.replace(s, moe_layers=s.moe_layers[:tower_layers(enc)])


def _vision_config(cfg) -> dict:
    from megamoe.config.vlm import encoder_tokens

    enc, s = hf_llava.encoder_cfg(cfg), _tower_shape(cfg)
    v = enc.model.vit
    vision = hf_vit.hf_config(enc, 2)
    for key in ("architectures", "model_type", "auto_map", "num_labels"):
        vision.pop(key)
    vision.update(num_hidden_layers=len(s.moe_layers), moe_layers=[int(x) for x in s.moe_layers],
                  num_tokens=encoder_tokens(cfg), hidden_act=v.activation, pre_norm=v.pre_norm,
                  patch_bias=v.patch_bias)
    return vision


def hf_config(cfg, vocab_size: int) -> dict:
    from megamoe.config.vlm import IMAGE_TOKEN_ID, image_tokens

    m, v = cfg.model, cfg.model.vlm
    text = hf_megamoe.hf_config(cfg, vocab_size)
    for key in ("architectures", "model_type", "auto_map"):
        text.pop(key)
    return {"architectures": ["MegamoeVLMForConditionalGeneration"], "model_type": MODEL_TYPE,
            "auto_map": AUTO_MAP, "vision_config": _vision_config(cfg), "text_config": text,
            "image_token_id": IMAGE_TOKEN_ID, "image_seq_length": image_tokens(cfg),
            "vision_feature_select_strategy": m.vit.vision_feature_select_strategy,
            "pixel_shuffle": v.pixel_shuffle,
            "projector_hidden_size": v.connector_hidden_size or m.hidden_size,
            "projector_hidden_act": "gelu", "tie_word_embeddings": m.tie_embeddings,
            "dtype": "float32"}


def _tower(src: TensorPool, s: DecoderShape, forward: bool) -> dict:
    """The tower's tensors under the other side's names (megamoe's without "vision.", HF's
    with their prefix)."""
    out = {}
    for ours, theirs in EMBEDDINGS:
        key, to = (ours, hf_llava.VISION + theirs) if forward else (hf_llava.VISION + theirs, ours)
        if src.has(key):
            out[to] = src.take(key)
    out.update(hf_vit.convert_layers(src, s, forward, TOWER))
    return out


def to_hf(tensors: dict, cfg) -> dict:
    """The vlm's global tensors (either layer layout) → the folder's tensors."""
    vision, connector, lm = hf_llava.split(tensors)
    src = TensorPool(unstack_layers(vision), "megamoe tower tensors")
    out = _tower(src, _tower_shape(cfg), True)
    src.expect_empty("not part of the vision tower's export")
    out.update(hf_llava.projector_tensors(connector, True))
    text = hf_layout.to_hf(lm, DecoderShape.from_config(cfg), hf_megamoe.NAMES)
    out.update(hf_llava.lm_to_hf(text))
    return out


def write_code(out_dir: str) -> None:
    hf_megamoe.write_code(out_dir, CODE_FILES)


def read_config(hf_dir: str):
    from megamoe.checkpoint.hf_remote.configuration_megamoe_vlm import MegamoeVLMConfig

    return hf_megamoe.read_config(hf_dir, MegamoeVLMConfig)


def _vision_overrides(c, text, where: str) -> list[str]:
    """The encoder's overrides of a MegamoeVLMConfig (ValueError naming what the vlm family
    cannot take: its encoder is multi-head, shares model.norm_epsilon and model.moe)."""
    vc = c.vision_config
    if vc.num_key_value_heads != vc.num_attention_heads or \
            vc.head_dim * vc.num_attention_heads != vc.hidden_size:
        raise ValueError(f"{where}: vision_config.num_key_value_heads / head_dim: "
                         f"{vc.num_key_value_heads} / {vc.head_dim}; megamoe's encoder is "
                         "multi-head with head_dim = hidden_size / heads")
    if float(vc.layer_norm_eps) != float(text.rms_norm_eps):
        raise ValueError(f"{where}: vision_config.layer_norm_eps: {vc.layer_norm_eps}; "
                         "megamoe's model.norm_epsilon is one value for the tower and the LM "
                         f"(text_config.rms_norm_eps {text.rms_norm_eps})")
    freq = "null"
    if any(vc.moe_layers):
        same = ("router", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "score_function", "shared_expert_intermediate_size")
        for field in same:
            if getattr(vc, field) != getattr(text, field):
                raise ValueError(f"{where}: vision_config.{field}: {getattr(vc, field)!r}; "
                                 f"megamoe's encoder MoE layers share model.moe with the LM "
                                 f"({getattr(text, field)!r})")
        freq = str([int(x) for x in vc.moe_layers]).replace(" ", "")
    connector = c.projector_hidden_size
    return [
        f"data.image_size={vc.image_size}", f"model.vit.patch_size={vc.patch_size}",
        f"model.vit.pool={vc.pool}", f"model.vit.position_embedding={vc.position_embedding}",
        f"model.vit.pre_norm={str(vc.pre_norm).lower()}",
        f"model.vit.patch_bias={str(vc.patch_bias).lower()}",
        f"model.vit.activation={vc.hidden_act}", "model.vit.vision_feature_layer=-1",
        f"model.vit.vision_feature_select_strategy={c.vision_feature_select_strategy}",
        f"model.vlm.encoder_num_layers={vc.num_hidden_layers}",
        f"model.vlm.encoder_hidden_size={vc.hidden_size}",
        f"model.vlm.encoder_ffn_hidden_size={vc.intermediate_size}",
        f"model.vlm.encoder_num_attention_heads={vc.num_attention_heads}",
        f"model.vlm.encoder_moe_layer_freq={freq}", f"model.vlm.pixel_shuffle={c.pixel_shuffle}",
        "model.vlm.connector_hidden_size=" + ("null" if connector == text.hidden_size
                                              else str(connector)),
    ]


def from_hf_config(c, where: str) -> tuple[list[str], DecoderShape, DecoderShape]:
    """megamoe overrides and the tensor layouts (LM, tower) of a MegamoeVLMConfig."""
    from megamoe.config.vlm import IMAGE_TOKEN_ID

    if c.image_token_id != IMAGE_TOKEN_ID:
        raise ValueError(f"{where}: image_token_id: {c.image_token_id}; megamoe's <image> "
                         f"placeholder is {IMAGE_TOKEN_ID}")
    text_overrides, shape = hf_megamoe.from_hf_config(c.text_config, where)
    vc = c.vision_config
    tower = DecoderShape(moe_layers=tuple(bool(x) for x in vc.moe_layers),
                         num_experts=vc.num_experts, heads=vc.num_attention_heads,
                         groups=vc.num_key_value_heads, head_dim=vc.head_dim, qkv_bias=True,
                         qk_norm=False, shared_expert=bool(vc.shared_expert_intermediate_size),
                         shared_gate=False, tied=False)
    overrides = ["model.family=vlm", "data.kind=scenes", *text_overrides,
                 *_vision_overrides(c, c.text_config, where)]
    return overrides, shape, tower


def from_hf(hf_tensors: dict, shape: DecoderShape, tower: DecoderShape, where: str) -> dict:
    """The folder's tensors → the vlm's global tensors (Megatron's layer layout)."""
    src = TensorPool({k: t for k, t in hf_tensors.items() if k.startswith(hf_llava.VISION)},
                     where)
    vision = _tower(src, tower, False)
    src.expect_empty("not in the megamoe vision tower")
    out = {"vision." + k: t for k, t in (stack_layers(vision) if len(set(tower.moe_layers)) == 1
                                         else vision).items()}
    out.update(hf_llava.projector_tensors({k: t for k, t in hf_tensors.items()
                                           if k.startswith(hf_llava.PROJECTOR_PREFIX)}, False))
    stray = sorted(k for k in hf_tensors if not k.startswith(
        (hf_llava.VISION, hf_llava.LM, hf_llava.PROJECTOR_PREFIX)) and k != "lm_head.weight")
    if stray:
        raise ValueError(f"{where}: tensors outside the vision tower, projector and language "
                         f"model: {', '.join(stray[:8])}")
    lm = hf_layout.from_hf(hf_llava.lm_from_hf(hf_tensors), shape, hf_megamoe.NAMES, where)
    if len(set(shape.moe_layers)) == 1 and shape.mor_unique is None:
        lm = stack_layers(lm)
    out.update(lm)
    return out
