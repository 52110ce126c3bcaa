"""The `vlm` family as transformers' `LlavaForConditionalGeneration`, both directions, where
LLaVA expresses the model exactly (`problems(cfg)` empty):
- vision tower: a CLIP-exact encoder (megamoe.checkpoint.hf_clip: class token, learned
  positions, pre-norm, a patch projection without bias, dense biased GELU or quick_gelu MLPs,
  multi-head attention), exported as a CLIPVisionModel of the tower's layers read at
  `vision_feature_layer: -1`, with megamoe's select strategy;
- projector: megamoe's connector is Megatron's MultimodalProjector, Linear(E → D) · GELU ·
  Linear(D → D), both biased; its GELU is the erf one (megamoe's transformer configs switch
  Megatron's bias-GELU fusion, a tanh approximation, off), which is LLaVA's
  `projector_hidden_act: "gelu"`. `connector_hidden_size` other than D and pixel shuffle do
  not fit LLaVA's projector;
- text model: Mixtral, Qwen2-MoE or Qwen3-MoE (the first that expresses the LM exactly, as
  for the lm family: routers other than softmax top-k, capacity dropping, MoR, modality norms…
  do not), its tensors named as the lm family's export under "model.language_model." (and
  `lm_head.weight`);
- `image_token_index` = megamoe's `<image>` id (IMAGE_TOKEN_ID), `image_seq_length` = the
  placeholders per image.

Dropped: the contrastive head (`model.vlm.contrastive_*`: temperature and projections) —
training only, no logit depends on it. Modality ids do not exist in LLaVA: a model whose routers
or norms read them is not LLaVA-exact (the remote code, hf_vlm, passes them).

Pixels: megamoe scales uint8 images to x/127.5 − 1; LLaVA takes float pixel_values, so pass
`images / 127.5 - 1` (or CLIPImageProcessor with `hf_clip.image_processor_fields`, written
to preprocessor_config.json by the export).
"""

from __future__ import annotations

from megamoe.checkpoint import hf_clip, hf_layout, hf_mixtral, hf_qwen2moe, hf_qwen3moe
from megamoe.checkpoint.global_load import stack_layers
from megamoe.checkpoint.hf_layout import DecoderShape

MODEL_TYPE = "llava"
TEXT_FAMILIES = (hf_mixtral, hf_qwen2moe, hf_qwen3moe)     # tried in this order
VISION, LM = "model.vision_tower.", "model.language_model."
LINEAR = ("weight", "bias")
PROJECTOR = [(f"connector.encoder.linear_fc{j}.{k}", f"model.multi_modal_projector.linear_{j}.{k}")
             for j in (1, 2) for k in LINEAR]
PROJECTOR_PREFIX = "model.multi_modal_projector."
DROPPED = ("contrastive.",)     # training-only tensors no Hugging Face model holds


def encoder_cfg(cfg):
    """The vlm's encoder as a vit config (megamoe.config.vlm.encoder_config), without the LM's
    Mixture-of-Recursions (the tower never recurses; its tensor layout must not either)."""
    import dataclasses

    from megamoe.config.vlm import encoder_config

    enc = encoder_config(cfg)
    mor = getattr(enc.model, "mor", None)
    if mor is not None and mor.enabled:
        enc.model.mor = dataclasses.replace(mor, enabled=False)
    return enc


def split(tensors: dict) -> tuple[dict, dict, dict]:
    """(tower tensors without "vision.", connector tensors, LM tensors) of the vlm's global
    tensors; the contrastive head's are left out (module docstring)."""
    vision, connector, lm = {}, {}, {}
    for key, t in tensors.items():
        if key.startswith("vision."):
            vision[key[len("vision."):]] = t
        elif key.startswith("connector."):
            connector[key] = t
        elif not key.startswith(DROPPED):
            lm[key] = t
    return vision, connector, lm


def text_family(cfg):
    """The first transformers text model that expresses the LM exactly, else None."""
    return next((f for f in TEXT_FAMILIES if not f.problems(cfg)), None)


def connector_problems(cfg) -> list[str]:
    """What LLaVA's projector (and placeholders) cannot express (field: reason)."""
    v, m, bad = cfg.model.vlm, cfg.model, []
    if v.pixel_shuffle > 1:
        bad.append(f"model.vlm.pixel_shuffle: {v.pixel_shuffle}; LLaVA's projector reads each "
                   "patch feature (no token merging)")
    if v.connector_hidden_size not in (None, m.hidden_size):
        bad.append(f"model.vlm.connector_hidden_size: {v.connector_hidden_size}; LLaVA's "
                   f"projector is model.hidden_size ({m.hidden_size}) wide")
    return bad


def problems(cfg) -> list[str]:
    """What LLaVA cannot express (field: reason); empty when it expresses the model exactly."""
    moe_field = "model.moe.num_experts:"   # the encoder's MoE layers: the vlm's own field
    bad = [f"model.vlm.encoder_moe_layer_freq: {cfg.model.vlm.encoder_moe_layer_freq!r};"
           + p[len(moe_field):] if p.startswith(moe_field) else p
           for p in hf_clip.problems(encoder_cfg(cfg))]
    bad += connector_problems(cfg)
    if text_family(cfg) is None:           # the closest text model's reasons
        bad += min((f.problems(cfg) for f in TEXT_FAMILIES), key=len)
    return bad


def _refuse_unless_exact(cfg) -> None:
    bad = problems(cfg)
    if bad:
        raise ValueError("not LLaVA-exact: " + "; ".join(bad))


def hf_config(cfg, vocab_size: int) -> dict:
    from megamoe.config.vlm import IMAGE_TOKEN_ID, image_tokens

    _refuse_unless_exact(cfg)
    text = text_family(cfg).hf_config(cfg, vocab_size)
    text.pop("architectures")
    enc = encoder_cfg(cfg)
    vision = hf_clip.clip_vision_config(enc).to_diff_dict()
    vision.pop("transformers_version", None)
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": MODEL_TYPE,
            "vision_config": vision, "text_config": text, "image_token_index": IMAGE_TOKEN_ID,
            "image_seq_length": image_tokens(cfg), "projector_hidden_act": "gelu",
            "multimodal_projector_bias": True, **hf_clip.llava_vision_fields(enc),
            "tie_word_embeddings": cfg.model.tie_embeddings, "dtype": "float32"}


def lm_to_hf(text: dict) -> dict:
    """The lm family's export names → the language model's inside LLaVA-style models."""
    return {(LM + k[len("model."):] if k.startswith("model.") else k): t
            for k, t in text.items()}


def lm_from_hf(hf_tensors: dict) -> dict:
    """The language model's tensors of a LLaVA-style folder under the lm export's names."""
    return {("model." + k[len(LM):] if k.startswith(LM) else k): t
            for k, t in hf_tensors.items() if k.startswith(LM) or k == "lm_head.weight"}


def to_hf(tensors: dict, cfg) -> dict:
    """The vlm's global tensors (either layer layout) → LlavaForConditionalGeneration's."""
    _refuse_unless_exact(cfg)
    vision, connector, lm = split(tensors)
    out = hf_clip.to_clip(vision, encoder_cfg(cfg), prefix=VISION)
    out.update(projector_tensors(connector, True))
    out.update(lm_to_hf(hf_layout.to_hf(lm, DecoderShape.from_config(cfg),
                                        text_family(cfg).NAMES)))
    return out


def projector_tensors(tensors: dict, forward: bool) -> dict:
    """The connector's tensors under the other side's names (`forward`: megamoe → HF)."""
    from megamoe.checkpoint.hf_layout import TensorPool

    src = TensorPool(tensors, "projector tensors")
    out = {}
    for ours, theirs in PROJECTOR:
        key, to = (ours, theirs) if forward else (theirs, ours)
        out[to] = src.take(key)
    src.expect_empty("not the projector's")
    return out


def vision_overrides(clip_config, vision_feature_layer: int, strategy: str) -> list[str]:
    """The vlm's encoder overrides for a CLIPVisionConfig (hf_clip.vit_overrides, moved to the
    model.vlm.encoder_* fields; MHA and the LM's norm eps are the vlm's own)."""
    rename = {"model.num_layers": "model.vlm.encoder_num_layers",
              "model.hidden_size": "model.vlm.encoder_hidden_size",
              "model.ffn_hidden_size": "model.vlm.encoder_ffn_hidden_size",
              "model.num_attention_heads": "model.vlm.encoder_num_attention_heads"}
    out = ["model.vlm.encoder_moe_layer_freq=null"]
    for item in hf_clip.vit_overrides(clip_config, vision_feature_layer=vision_feature_layer,
                                      vision_feature_select_strategy=strategy):
        key, _, value = item.partition("=")
        if key in rename:
            out.append(f"{rename[key]}={value}")
        elif key.startswith(("model.vit.", "data.")):
            out.append(item)
    return out


def from_hf_config(c, where: str) -> tuple[list[str], DecoderShape, object]:
    """megamoe overrides, the LM's tensor layout and its text family of a LlavaConfig;
    ValueError naming the field megamoe cannot take."""
    from megamoe.config.vlm import IMAGE_TOKEN_ID

    families = {f.MODEL_TYPE: f for f in TEXT_FAMILIES}
    text, vision = c.text_config, c.vision_config
    checks = [
        (c.image_token_index == IMAGE_TOKEN_ID, f"image_token_index: {c.image_token_index}; "
         f"megamoe's <image> placeholder is {IMAGE_TOKEN_ID}"),
        (c.projector_hidden_act == "gelu", f"projector_hidden_act: {c.projector_hidden_act!r}; "
         "megamoe's connector is GELU (erf)"),
        (bool(c.multimodal_projector_bias), "multimodal_projector_bias: false; megamoe's "
         "connector is biased"),
        (isinstance(c.vision_feature_layer, int), f"vision_feature_layer: "
         f"{c.vision_feature_layer!r}; megamoe's tower hands on one layer"),
        (vision.model_type == "clip_vision_model", f"vision_config.model_type: "
         f"{vision.model_type!r}; megamoe's tower is CLIP's"),
        (text.model_type in families, f"text_config.model_type: {text.model_type!r}; megamoe "
         f"imports {', '.join(families)}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{where}: {message}")
    if float(vision.layer_norm_eps) != float(text.rms_norm_eps):
        raise ValueError(f"{where}: vision_config.layer_norm_eps: {vision.layer_norm_eps}; "
                         f"megamoe's model.norm_epsilon is one value for the tower and the LM "
                         f"(text_config.rms_norm_eps {text.rms_norm_eps})")
    family = families[text.model_type]
    overrides, shape = family.from_hf_config(text, where)
    overrides = ["model.family=vlm", "data.kind=scenes", *overrides,
                 *vision_overrides(vision, c.vision_feature_layer,
                                   c.vision_feature_select_strategy),
                 "model.vlm.pixel_shuffle=1", "model.vlm.connector_hidden_size=null"]
    return overrides, shape, family


def from_hf(hf_tensors: dict, overrides: list[str], shape: DecoderShape, family,
            where: str) -> dict:
    """A LLaVA folder's tensors → the vlm's global tensors (Megatron's layer layout)."""
    from megamoe.config import load_config

    stray = sorted(k for k in hf_tensors if not k.startswith((VISION, LM, PROJECTOR_PREFIX))
                   and k != "lm_head.weight")
    if stray:
        raise ValueError(f"{where}: tensors outside LLaVA's vision tower, projector and "
                         f"language model: {', '.join(stray[:8])}")
    enc = encoder_cfg(load_config(None, overrides))
    vision = hf_clip.from_clip(hf_tensors, enc, prefix=VISION, where=where)
    out = {"vision." + k: t for k, t in vision.items()}
    out.update(projector_tensors({k: t for k, t in hf_tensors.items()
                                  if k.startswith(PROJECTOR_PREFIX)}, False))
    lm = hf_layout.from_hf(lm_from_hf(hf_tensors), shape, family.NAMES, where)
    out.update(stack_layers(lm) if len(set(shape.moe_layers)) == 1 else lm)
    return out
