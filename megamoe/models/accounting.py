"""Total and active parameters and training FLOPs per token of a language model (the `lm`
family), plain or Mixture-of-Recursions (megamoe.mor.accounting)."""

from __future__ import annotations

from megamoe.specs.accounting import embedding_parameters, layer_parameters
from megamoe.specs.gpt_moe import moe_layer_pattern


def parameter_counts(cfg, vocab_size: int) -> tuple[int, int]:
    """(total, active per token) parameters of the model described by `cfg`."""
    if cfg.model.mor.enabled:    # shared pool, tokens at each recursion depth
        from megamoe.mor.accounting import mor_parameter_counts
        return mor_parameter_counts(cfg, vocab_size)
    total = active = embedding_parameters(cfg, vocab_size)
    for is_moe in moe_layer_pattern(cfg.model.num_layers, cfg.model.moe.layer_freq,
                                    cfg.model.moe.num_experts):
        layer_total, layer_active = layer_parameters(cfg, is_moe, vocab_size)
        total += layer_total
        active += layer_active
    return total, active


def flops_per_token(cfg, vocab_size: int) -> float:
    """Training FLOPs per token: 6 × active matmul parameters + causal attention scores."""
    if cfg.model.mor.enabled:    # capacities shrink both terms per recursion step
        from megamoe.mor.accounting import mor_flops_per_token
        return mor_flops_per_token(cfg, vocab_size)
    _, active = parameter_counts(cfg, vocab_size)
    m = cfg.model
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    attention = 6 * m.num_layers * m.seq_length * m.num_attention_heads * d  # QKᵀ and AV, causal
    return 6.0 * active + attention
