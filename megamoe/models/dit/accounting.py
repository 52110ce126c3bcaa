"""Total and active parameters and training FLOPs per image of the DiT
(megamoe.models.dit.model). Pure functions of the config; a unit test compares them with the
built model's parameter count."""

from __future__ import annotations

from megamoe.config.diffusion import dit_tokens
from megamoe.specs.gpt_moe import moe_layer_pattern

CHANNELS = 3


def _layer(cfg, is_moe: bool) -> tuple[int, int]:
    """(total, active per token) parameters of one DiT block without its adaLN modulation:
    biased attention, MLP or MoE (E experts of width F_e, k active; the router's [E, D] gate
    and the family's own parameters; an unbiased shared expert). The norms have no
    parameters."""
    m, moe = cfg.model, cfg.model.moe
    D = m.hidden_size
    d = m.kv_channels or D // m.num_attention_heads
    inner, kv = m.num_attention_heads * d, (m.num_query_groups or m.num_attention_heads) * d
    qkv = inner + 2 * kv
    attn = D * qkv + qkv + inner * D + D

    def mlp(width: int) -> int:
        return 2 * D * width + width + D

    if not is_moe:
        return attn + mlp(m.ffn_hidden_size), attn + mlp(m.ffn_hidden_size)
    from megamoe.moe.routers import ROUTERS

    # what a token's target holds (Race's PLR head predicts it): p²·C values
    target = CHANNELS * cfg.model.dit.patch_size ** 2
    extra_total, extra_active = ROUTERS[moe.router].extra_parameters(moe, D, target)
    shared = 2 * D * moe.shared_expert_ffn_hidden_size     # no biases (megamoe.specs.dit)
    shared += D if moe.shared_expert_gate else 0
    common = attn + moe.num_experts * D + shared
    return (common + moe.num_experts * mlp(moe.ffn_hidden_size) + extra_total,
            common + moe.topk * mlp(moe.ffn_hidden_size) + extra_active)


def _per_image(cfg) -> int:
    """Parameters applied once per image: the timestep MLP, the class table (one row used,
    all counted), each block's adaLN modulation (6D × D + 6D) and the final layer's (2D)."""
    m, d = cfg.model, cfg.model.dit
    D, F = m.hidden_size, d.frequency_embedding_size
    embedders = F * D + D + D * D + D + (cfg.data.num_classes + 1) * D
    return embedders + m.num_layers * (6 * D * D + 6 * D) + 2 * D * D + 2 * D


def _per_patch(cfg) -> int:
    """The patch projection and the final projection back to pixels."""
    D, p = cfg.model.hidden_size, cfg.model.dit.patch_size
    pixels = CHANNELS * p * p
    return (pixels * D + D) + (D * pixels + pixels)


def parameter_counts(cfg, _output_size=None) -> tuple[int, int]:
    """(total, active per image): every parameter but the experts touches every image; experts
    count k of E."""
    m = cfg.model
    total = active = _per_image(cfg) + _per_patch(cfg)
    for is_moe in moe_layer_pattern(m.num_layers, m.moe.layer_freq, m.moe.num_experts):
        layer_total, layer_active = _layer(cfg, is_moe)
        total += layer_total
        active += layer_active
    return total, active


def flops_per_image(cfg, _output_size=None) -> float:
    """Training FLOPs per image: 6 × (active block parameters and patch projections × S
    tokens + the per-image conditioning) + bidirectional attention scores and values
    (12·L·S²·d_attn)."""
    m = cfg.model
    S, D = dit_tokens(cfg), m.hidden_size
    layers = sum(_layer(cfg, is_moe)[1]
                 for is_moe in moe_layer_pattern(m.num_layers, m.moe.layer_freq,
                                                 m.moe.num_experts))
    inner = m.num_attention_heads * (m.kv_channels or D // m.num_attention_heads)
    conditioning = _per_image(cfg) - (cfg.data.num_classes + 1) * D   # a lookup, no matmul
    matmuls = (layers + _per_patch(cfg)) * S + conditioning
    return 6.0 * matmuls + 12.0 * m.num_layers * S * S * inner
