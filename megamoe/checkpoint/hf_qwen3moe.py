"""Hugging Face Qwen3-MoE (`Qwen3MoeForCausalLM`, Qwen team 2025): megamoe's block with QK-norm —
an RMSNorm over each query and key head's d channels before RoPE, exactly megamoe's
`model.qk_layernorm` — no shared expert, no qkv bias, dense layers anywhere (`mlp_only_layers`).

Qwen3-MoE's router takes softmax over all E logits and keeps the top k, renormalised when
`norm_topk_prob` (megamoe's `model.moe.renormalize`). Its `attention_bias` would also bias
o_proj, which megamoe has not, so configs with `model.add_qkv_bias` go to remote code.
"""

from __future__ import annotations

from megamoe.checkpoint.hf_fields import (
    decoder_config, decoder_overrides, layer_freq_override, qwen_layer_fields, qwen_moe_layers,
    renormalize, transformers_problems,
)
from megamoe.checkpoint.hf_layout import DENSE, DecoderShape, Names

MODEL_TYPE = "qwen3_moe"
NAMES = Names(moe_block="mlp", expert=DENSE)


def problems(cfg) -> list[str]:
    """What Qwen3-MoE cannot express (field: reason)."""
    m, moe = cfg.model, cfg.model.moe
    bad = transformers_problems(cfg)
    if not m.qk_layernorm:
        bad.append("model.qk_layernorm: false; Qwen3-MoE always normalises q and k per head")
    if m.add_qkv_bias:
        bad.append("model.add_qkv_bias: Qwen3-MoE's attention_bias also biases o_proj")
    if moe.shared_expert_ffn_hidden_size:
        bad.append("model.moe.shared_expert_ffn_hidden_size: Qwen3-MoE has no shared expert")
    return bad


def hf_config(cfg, vocab_size: int) -> dict:
    m, moe = cfg.model, cfg.model.moe
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": MODEL_TYPE,
        **decoder_config(cfg, vocab_size), **qwen_layer_fields(cfg),
        "intermediate_size": m.ffn_hidden_size, "moe_intermediate_size": moe.ffn_hidden_size,
        "num_experts": moe.num_experts, "norm_topk_prob": renormalize(moe),
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
    }


def from_hf_config(c, where: str) -> tuple[list[str], DecoderShape]:
    """megamoe overrides and the tensor layout of a Qwen3-MoE config object."""
    if getattr(c, "use_sliding_window", False):
        raise ValueError(f"{where}: use_sliding_window true; megamoe's attention sees the whole "
                         "causal prefix")
    if getattr(c, "attention_bias", False):
        raise ValueError(f"{where}: attention_bias true; megamoe's attention output projection "
                         "has no bias")
    if not c.num_experts:
        raise ValueError(f"{where}: num_experts 0; megamoe imports Qwen3-MoE with experts")
    overrides, heads, groups, head_dim = decoder_overrides(c, where, qk_norm=True,
                                                           norm_topk_prob=c.norm_topk_prob)
    moe_layers = qwen_moe_layers(c, where)
    overrides += [
        f"model.moe.num_experts={c.num_experts}",
        f"model.moe.ffn_hidden_size={c.moe_intermediate_size}",
        f"model.ffn_hidden_size={c.intermediate_size}", layer_freq_override(moe_layers),
        "model.add_qkv_bias=false", "model.moe.shared_expert_ffn_hidden_size=0",
        "model.moe.shared_expert_gate=false",
    ]
    shape = DecoderShape(moe_layers=moe_layers, num_experts=c.num_experts, heads=heads,
                         groups=groups, head_dim=head_dim, qkv_bias=False, qk_norm=True,
                         shared_expert=False, shared_gate=False, tied=bool(c.tie_word_embeddings))
    return overrides, shape
