"""Total and active parameters and training FLOPs per token of the multimodal model
(megamoe.models.vlm.model): the LM's (megamoe.models.accounting), the encoder's (the vit
family's layer count, megamoe.models.vit.accounting, at the encoder's sizes) and the
connector's. Pure functions of the config; a unit test compares the total with the built model.

Per-token figures spread the image's cost over the sequence: an image is encoded once per
sample of S tokens, so its encoder and connector FLOPs count 1/S per token.
"""

from __future__ import annotations

from megamoe.config.audio import encoder_channels
from megamoe.config.vlm import encoder_config, encoder_tokens, image_tokens, patch_side
from megamoe.specs.accounting import modality_norm_parameters
from megamoe.specs.gpt_moe import moe_layer_pattern


def _encoder(cfg) -> tuple[int, int]:
    """(total, active per token) of the vision tower: patch projection (+ bias), class token,
    learned positions, CLIP's pre-norm, the layers it runs (`model.vit.vision_feature_layer`);
    no final norm (megamoe.models.vit.model.build_vision_tower)."""
    from megamoe.config.vision import tower_layers
    from megamoe.models.vit.accounting import _layer

    enc = encoder_config(cfg)
    m, v, E = enc.model, enc.model.vit, enc.model.hidden_size
    embed = encoder_channels(cfg) * v.patch_size ** 2 * E + (E if v.patch_bias else 0) \
        + (E if v.pool == "cls" else 0) + (2 * E if v.pre_norm else 0)
    if v.position_embedding == "learned":
        embed += encoder_tokens(cfg) * E
    total = active = embed
    # CogVideoX's expert AdaLN on both norms of a layer, if on (every token is an image token)
    adaln_total, adaln_active = (2 * n for n in modality_norm_parameters(m, None))
    pattern = moe_layer_pattern(m.num_layers, m.moe.layer_freq, m.moe.num_experts)
    for is_moe in pattern[:tower_layers(enc)]:
        layer_total, layer_active = _layer(enc, is_moe)
        total, active = total + layer_total + adaln_total, active + layer_active + adaln_active
    return total, active


def _connector(cfg) -> int:
    v, D = cfg.model.vlm, cfg.model.hidden_size
    inp, hidden = v.pixel_shuffle ** 2 * v.encoder_hidden_size, v.connector_hidden_size or D
    return inp * hidden + hidden + hidden * D + D


def parameter_counts(cfg, vocab_size: int) -> tuple[int, int]:
    """(total, active per token): every encoder and connector parameter is active for every
    sample; the LM's as the lm family counts them."""
    from megamoe.models.accounting import parameter_counts as lm_counts

    lm_total, lm_active = lm_counts(cfg, vocab_size)
    enc_total, enc_active = _encoder(cfg)
    conn = _connector(cfg)
    return lm_total + enc_total + conn, lm_active + enc_active + conn


def flops_per_token(cfg, vocab_size: int) -> float:
    """The LM's training FLOPs per token plus, per text token, 1/S of the image's: 6 × (active
    encoder parameters × N patches + connector × n tokens) + bidirectional attention
    (12·L·N²·E)."""
    from megamoe.models.accounting import flops_per_token as lm_flops

    enc = encoder_config(cfg)
    N, S = patch_side(cfg) ** 2, cfg.model.seq_length
    _, enc_active = _encoder(cfg)
    N = encoder_tokens(cfg)
    image = 6.0 * (enc_active * N + _connector(cfg) * image_tokens(cfg)) \
        + 12.0 * enc.model.num_layers * N * N * enc.model.hidden_size
    return lm_flops(cfg, vocab_size) + image / S
