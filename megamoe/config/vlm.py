"""Options of the `vlm` family (`model.vlm`): the vision encoder, the connector and how image
tokens enter the language model. The language model itself uses `model`'s common keys (layers,
width, heads, FFN, `model.moe`, `model.mor`); the encoder's patches and positions use
`model.vit.patch_size` and `model.vit.position_embedding`.

The encoder is the `vit` family's vision tower (megamoe.models.vit.model.build_vision_tower:
no head, no final norm; its `model.vit` options — class token, CLIP's pre-norm, patch bias,
activation, `vision_feature_layer`, `vision_feature_select_strategy` — apply as they do to a
CLIP tower read by LLaVA). Its patch features are reduced by pixel shuffle (`pixel_shuffle` r:
each r×r block of neighbouring patches becomes one token of r²× the width, InternVL / NVLM's
token reduction) and projected to the LM width by a two-layer GELU MLP (LLaVA-1.5's projector).
The LM sees `image_tokens(cfg)` placeholders per image: the tower's feature tokens / r².

Video (`data.kind: clips`, T = `data.num_frames` frames): the tower embeds tubelets of
`model.vit.tubelet_size` t frames × p × p pixels (megamoe.blocks.tubelets), so a clip is T/t
time slices of patches, each slice pixel-shuffled on its own: T/t · (side / r)² image tokens.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

from megamoe.config.errors import at_least, fail, greater_than
from megamoe.config.vision import time_slices

# the placeholder token the data puts where image embeddings go: the word tokenizer's fixed
# special id for "<image>" (megamoe.data.word_tokenizer; a test holds the two equal)
IMAGE_TOKEN_ID = 3
# the padding after a sample (and a packed row's unused tail): the word tokenizer's "<pad>"; the
# LM's MoE routers leave these tokens out (megamoe.models.vlm.model.VLMModel.padding_mask)
PAD_TOKEN_ID = 0


@dataclass
class VLMOptions:
    SECTION: ClassVar[str] = "model.vlm"

    encoder_num_layers: int = 2
    encoder_hidden_size: int = 64
    encoder_num_attention_heads: int = 4
    encoder_ffn_hidden_size: int = 128
    # MoE FFNs in the encoder (model.moe's experts and router, which must be one of the vit
    # family's: topk, vmoe, soft, expert_choice, dit_moe): None keeps it dense; N or a 0/1
    # list as model.moe.layer_freq (V-MoE: every other layer). Expert parallelism: the
    # encoder's experts live on the LM's expert grid (parallel.expert, expert_tensor), also
    # when the encoder has its own grid (parallel.vision_tensor) — all-to-all within the LM's
    # EP group, each expert's gradient reduced over the expert-DP ranks exactly once, like the
    # LM's experts; with parallel.expert 1 they are replicas on every first-stage rank. Their
    # biases need parallel.expert_tensor 1 and no shared expert (Megatron-Core's is unbiased).
    # On the encoder's own grid its routing groups (the token sets aux losses and capacities
    # are computed over) are each encoder DP rank's slice of the micro-batch, as Megatron
    # computes them per rank's tokens.
    encoder_moe_layer_freq: int | list[int] | None = None
    pixel_shuffle: int = 1               # r: r×r patches → one token (1: off)
    connector_hidden_size: int | None = None   # None: the LM's model.hidden_size
    # LIMoE-style image-text contrastive loss added to the next-token loss (0: off): image =
    # mean-pooled connector output, text = the LM's final state at the caption's <eos> in a
    # text-only pass; negatives over the data-parallel micro-batch (megamoe.models.contrastive)
    contrastive_coeff: float = 0.0
    contrastive_init_temperature: float = 0.07    # CLIP's (LIMoE's own was not retrieved)
    contrastive_proj_dim: int | None = None        # None: no projections (both sides are D)

    def validate(self) -> None:
        for name in ("encoder_num_layers", "encoder_hidden_size", "encoder_num_attention_heads",
                     "encoder_ffn_hidden_size", "pixel_shuffle", "connector_hidden_size",
                     "contrastive_proj_dim"):
            at_least(self, name, 1)
        at_least(self, "contrastive_coeff", 0)
        greater_than(self, "contrastive_init_temperature", 0)
        if self.encoder_hidden_size % self.encoder_num_attention_heads:
            fail("model.vlm.encoder_hidden_size", f"{self.encoder_hidden_size} is not divisible "
                 f"by model.vlm.encoder_num_attention_heads ({self.encoder_num_attention_heads})")
        freq = self.encoder_moe_layer_freq
        if isinstance(freq, int):
            at_least(self, "encoder_moe_layer_freq", 1)
        elif freq is not None:
            if any(x not in (0, 1) for x in freq):
                fail("model.vlm.encoder_moe_layer_freq", f"a list must hold only 0 and 1, got "
                     f"{freq}")
            if len(freq) != self.encoder_num_layers:
                fail("model.vlm.encoder_moe_layer_freq", f"has {len(freq)} entries, "
                     f"model.vlm.encoder_num_layers is {self.encoder_num_layers}")


def patch_side(cfg) -> int:
    """Patches per image side (ConfigError naming the field when the patch does not tile the
    image or pixel shuffle does not tile the patch grid)."""
    size, patch, r = cfg.data.image_size, cfg.model.vit.patch_size, cfg.model.vlm.pixel_shuffle
    if size % patch:
        fail("model.vit.patch_size", f"{patch} does not divide data.image_size ({size})")
    if (size // patch) % r:
        fail("model.vlm.pixel_shuffle", f"{r} does not divide the {size // patch} patches per "
             f"image side (data.image_size / model.vit.patch_size)")
    return size // patch


def image_tokens(cfg) -> int:
    """Image embeddings (placeholders in the text) per image: the tower's patch features
    (+ the class token with `vision_feature_select_strategy: full`), r² of them per token."""
    v, r = cfg.model.vit, cfg.model.vlm.pixel_shuffle
    with_class = v.pool == "cls" and v.vision_feature_select_strategy == "full"
    if with_class and r > 1:
        fail("model.vlm.pixel_shuffle", "needs the patch grid alone: set "
             "model.vit.vision_feature_select_strategy to 'default' (drops the class token)")
    return (patch_side(cfg) // r) ** 2 * time_slices(cfg) + with_class


def encoder_tokens(cfg) -> int:
    """Tokens the encoder runs on per image or clip (its context's sequence): the patches (of
    every time slice), plus the class token with `model.vit.pool: cls`."""
    return patch_side(cfg) ** 2 * time_slices(cfg) + (cfg.model.vit.pool == "cls")


def encoder_config(cfg):
    """A copy of `cfg` whose `model` describes the encoder alone (width, layers, heads, FFN,
    MoE pattern; `model.vit` as configured), so the vit family's transformer config, vision
    tower and accounting apply to it unchanged."""
    v = cfg.model.vlm
    enc = copy.copy(cfg)
    enc.model = copy.copy(cfg.model)
    enc.model.num_layers = v.encoder_num_layers
    enc.model.hidden_size = v.encoder_hidden_size
    enc.model.num_attention_heads = v.encoder_num_attention_heads
    enc.model.ffn_hidden_size = v.encoder_ffn_hidden_size
    enc.model.num_query_groups = None
    enc.model.kv_channels = None
    enc.model.moe = copy.copy(cfg.model.moe)
    if v.encoder_moe_layer_freq is None:
        enc.model.moe.num_experts = 0
    else:
        enc.model.moe.layer_freq = v.encoder_moe_layer_freq
    return enc
