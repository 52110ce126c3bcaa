"""Hugging Face Mixtral (`MixtralForCausalLM`, Jiang et al. 2024): megamoe's foundation block —
an MoE FFN in every layer, no qkv bias, no shared expert, no QK-norm.

Mixtral's router takes softmax over all E logits, keeps the top k and renormalises them, which
equals megamoe's softmax over the selected logits: p_i = exp(l_i) / Σ_{j∈topk} exp(l_j).
"""

from __future__ import annotations

from megamoe.checkpoint.hf_fields import (
    decoder_config, decoder_overrides, layer_freq_override, pattern_problem, renormalize,
    transformers_problems,
)
from megamoe.checkpoint.hf_layout import DecoderShape, Names

MODEL_TYPE = "mixtral"
NAMES = Names(moe_block="block_sparse_moe", expert=("w1", "w3", "w2"))


def problems(cfg) -> list[str]:
    """What Mixtral cannot express (field: reason)."""
    m, moe = cfg.model, cfg.model.moe
    bad = transformers_problems(cfg) + pattern_problem(cfg, "Mixtral")
    if m.add_qkv_bias:
        bad.append("model.add_qkv_bias: Mixtral has no qkv bias")
    if m.qk_layernorm:
        bad.append("model.qk_layernorm: Mixtral has no QK-norm")
    if moe.shared_expert_ffn_hidden_size:
        bad.append("model.moe.shared_expert_ffn_hidden_size: Mixtral has no shared expert")
    if not renormalize(moe):
        bad.append("model.moe.renormalize: false; Mixtral renormalises the top-k probabilities")
    return bad


def hf_config(cfg, vocab_size: int) -> dict:
    moe = cfg.model.moe
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": MODEL_TYPE,
        **decoder_config(cfg, vocab_size),
        "intermediate_size": moe.ffn_hidden_size, "num_local_experts": moe.num_experts,
        "sliding_window": None, "router_jitter_noise": 0.0,
    }


def from_hf_config(c, where: str) -> tuple[list[str], DecoderShape]:
    """megamoe overrides and the tensor layout of a Mixtral config object."""
    if getattr(c, "sliding_window", None):
        raise ValueError(f"{where}: sliding_window {c.sliding_window}; megamoe's attention sees "
                         "the whole causal prefix")
    overrides, heads, groups, head_dim = decoder_overrides(c, where)
    moe_layers = (True,) * c.num_hidden_layers
    overrides += [
        f"model.moe.num_experts={c.num_local_experts}",
        f"model.moe.ffn_hidden_size={c.intermediate_size}",
        layer_freq_override(moe_layers), "model.add_qkv_bias=false",
        "model.moe.shared_expert_ffn_hidden_size=0", "model.moe.shared_expert_gate=false",
    ]
    shape = DecoderShape(moe_layers=moe_layers, num_experts=c.num_local_experts, heads=heads,
                         groups=groups, head_dim=head_dim, qkv_bias=False, qk_norm=False,
                         shared_expert=False, shared_gate=False,
                         tied=bool(c.tie_word_embeddings))
    return overrides, shape
