"""Total and active parameters and training FLOPs per image of the ViT / V-MoE classifier
(megamoe.models.vit.model). Pure functions of the config; a unit test compares them with the
built model's parameter count."""

from __future__ import annotations

from megamoe.config.vision import grid_side, image_tokens, num_classes
from megamoe.specs.gpt_moe import moe_layer_pattern


def _layer(cfg, is_moe: bool) -> tuple[int, int]:
    """(total, active per token) parameters of one encoder layer: biased attention and MLP,
    two LayerNorms; MoE: E experts of width F_e (k active), the router's [E, D] gate (no
    bias: megamoe.models.vit.model.drop_router_biases) and the
    family's own parameters (`MegamoeRouter.extra_parameters`), shared experts."""
    m, moe = cfg.model, cfg.model.moe
    D = m.hidden_size
    d = m.kv_channels or D // m.num_attention_heads
    inner, kv = m.num_attention_heads * d, (m.num_query_groups or m.num_attention_heads) * d
    qkv = inner + 2 * kv
    attn = D * qkv + qkv + inner * D + D
    norms = 4 * D

    def mlp(width: int) -> int:
        return 2 * D * width + width + D

    if not is_moe:
        dense = attn + norms + mlp(m.ffn_hidden_size)
        return dense, dense
    from megamoe.moe.routers import ROUTERS

    extra_total, extra_active = ROUTERS[moe.router].extra_parameters(moe, D, 0)
    shared = mlp(moe.shared_expert_ffn_hidden_size) if moe.shared_expert_ffn_hidden_size else 0
    shared += D if moe.shared_expert_gate else 0
    common = attn + norms + moe.num_experts * D + shared
    return (common + moe.num_experts * mlp(moe.ffn_hidden_size) + extra_total,
            common + moe.topk * mlp(moe.ffn_hidden_size) + extra_active)


def parameter_counts(cfg, _output_size=None) -> tuple[int, int]:
    """(total, active per image) parameters: embedding (with CLIP's pre-LayerNorm when set),
    layers, final norm, head (every parameter touches every image; experts count k of E)."""
    m, v = cfg.model, cfg.model.vit
    D = m.hidden_size
    embed = 3 * v.patch_size ** 2 * D + (D if v.patch_bias else 0) \
        + (D if v.pool == "cls" else 0) + (2 * D if v.pre_norm else 0)
    if v.position_embedding == "learned":
        embed += image_tokens(cfg) * D
    head = 2 * D + D * num_classes(cfg) + num_classes(cfg)
    total = active = embed + head
    for is_moe in moe_layer_pattern(m.num_layers, m.moe.layer_freq, m.moe.num_experts):
        layer_total, layer_active = _layer(cfg, is_moe)
        total += layer_total
        active += layer_active
    return total, active


def flops_per_image(cfg, _output_size=None) -> float:
    """Training FLOPs per image: 6 × (active layer parameters × S tokens + patch projection × N
    patches + head) + bidirectional attention scores and values (12·L·S²·d_attn)."""
    m, v = cfg.model, cfg.model.vit
    S, N, D = image_tokens(cfg), grid_side(cfg) ** 2, m.hidden_size
    layers = sum(_layer(cfg, is_moe)[1]
                 for is_moe in moe_layer_pattern(m.num_layers, m.moe.layer_freq,
                                                 m.moe.num_experts))
    inner = m.num_attention_heads * (m.kv_channels or D // m.num_attention_heads)
    matmuls = layers * S + 3 * v.patch_size ** 2 * D * N + D * num_classes(cfg)
    return 6.0 * matmuls + 12.0 * m.num_layers * S * S * inner
