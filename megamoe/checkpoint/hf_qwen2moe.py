"""Hugging Face Qwen2-MoE (`Qwen2MoeForCausalLM`): megamoe's block with a gated shared expert,
y = Σ_{i∈topk} p_i·E_i(x) + σ(x·w_g)·S(x), optional qkv bias, and dense layers anywhere
(`mlp_only_layers`).

Qwen2-MoE's router takes softmax over all E logits and keeps the top k; with
`norm_topk_prob=true` it renormalises them, which equals megamoe's softmax over the selected
logits, and with `false` (e.g. Qwen1.5-MoE) it is megamoe's `model.moe.renormalize: false`.
"""

from __future__ import annotations

from megamoe.checkpoint.hf_fields import (
    decoder_config, decoder_overrides, layer_freq_override, qwen_layer_fields, qwen_moe_layers,
    renormalize, transformers_problems,
)
from megamoe.checkpoint.hf_layout import DENSE, DecoderShape, Names

MODEL_TYPE = "qwen2_moe"
NAMES = Names(moe_block="mlp", expert=DENSE)


def problems(cfg) -> list[str]:
    """What Qwen2-MoE cannot express (field: reason)."""
    m, moe = cfg.model, cfg.model.moe
    bad = transformers_problems(cfg)
    if m.qk_layernorm:
        bad.append("model.qk_layernorm: Qwen2-MoE has no QK-norm")
    if not moe.shared_expert_ffn_hidden_size:
        bad.append("model.moe.shared_expert_ffn_hidden_size: 0; Qwen2-MoE always has a shared "
                   "expert")
    elif not moe.shared_expert_gate:
        bad.append("model.moe.shared_expert_gate: false; Qwen2-MoE always gates its shared "
                   "expert by sigmoid(x·w)")
    return bad


def hf_config(cfg, vocab_size: int) -> dict:
    m, moe = cfg.model, cfg.model.moe
    return {
        "architectures": ["Qwen2MoeForCausalLM"], "model_type": MODEL_TYPE,
        **decoder_config(cfg, vocab_size), **qwen_layer_fields(cfg),
        "intermediate_size": m.ffn_hidden_size, "moe_intermediate_size": moe.ffn_hidden_size,
        "shared_expert_intermediate_size": moe.shared_expert_ffn_hidden_size,
        "num_experts": moe.num_experts, "norm_topk_prob": renormalize(moe),
        "qkv_bias": m.add_qkv_bias, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": m.num_layers,
    }


def from_hf_config(c, where: str) -> tuple[list[str], DecoderShape]:
    """megamoe overrides and the tensor layout of a Qwen2-MoE config object."""
    if getattr(c, "use_sliding_window", False):
        raise ValueError(f"{where}: use_sliding_window true; megamoe's attention sees the whole "
                         "causal prefix")
    if not c.num_experts or not c.shared_expert_intermediate_size:
        raise ValueError(f"{where}: num_experts {c.num_experts}, shared_expert_intermediate_size "
                         f"{c.shared_expert_intermediate_size}; megamoe imports Qwen2-MoE with "
                         "experts and a shared expert")
    overrides, heads, groups, head_dim = decoder_overrides(c, where,
                                                           norm_topk_prob=c.norm_topk_prob)
    moe_layers = qwen_moe_layers(c, where)
    qkv_bias = bool(getattr(c, "qkv_bias", True))
    overrides += [
        f"model.moe.num_experts={c.num_experts}",
        f"model.moe.ffn_hidden_size={c.moe_intermediate_size}",
        f"model.ffn_hidden_size={c.intermediate_size}", layer_freq_override(moe_layers),
        f"model.add_qkv_bias={str(qkv_bias).lower()}",
        f"model.moe.shared_expert_ffn_hidden_size={c.shared_expert_intermediate_size}",
        "model.moe.shared_expert_gate=true",
    ]
    shape = DecoderShape(moe_layers=moe_layers, num_experts=c.num_experts, heads=heads,
                         groups=groups, head_dim=head_dim, qkv_bias=qkv_bias, qk_norm=False,
                         shared_expert=True, shared_gate=True, tied=bool(c.tie_word_embeddings))
    return overrides, shape
