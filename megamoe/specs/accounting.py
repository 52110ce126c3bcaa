"""Parameter arithmetic of the decoder layers the specs build (megamoe.specs.gpt_moe): the
embedding and output layer, one dense or MoE layer with its router family's own parameters.
Pure functions of the config; `megamoe.models.accounting` and `megamoe.mor.accounting` sum them
over a model's layers."""

from __future__ import annotations


def embedding_parameters(cfg, vocab_size: int) -> int:
    """Input embedding, output layer (unless tied) and the final norm."""
    m = cfg.model
    return vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2) + m.hidden_size


def modality_norm_parameters(model_cfg, timestep_dim: int | None) -> tuple[int, int]:
    """(total, active per token) modulation parameters of one `ModalityExpertAdaLN`
    (megamoe.blocks.norms; its shared norm is counted with the plain norms): learned shift
    and scale [M, D], or the Linear C → 2·M·D from the timestep embedding; a token uses its
    modality's share."""
    if model_cfg.modality_norm == "none":
        return 0, 0
    M, D = model_cfg.num_modalities, model_cfg.hidden_size
    per_modality = 2 * D * (timestep_dim + 1 if timestep_dim else 1)
    return M * per_modality, per_modality


def layer_parameters(cfg, is_moe: bool, vocab_size: int = 0) -> tuple[int, int]:
    """(total, active per token) parameters of one decoder layer (MoE: with the router
    family's own parameters, `MegamoeRouter.extra_parameters`; with the modulation of its
    two norms)."""
    from megamoe.data.synthetic_context import timestep_embedding_width

    m, moe = cfg.model, cfg.model.moe
    norm_total, norm_active = modality_norm_parameters(
        m, timestep_embedding_width(cfg.data, m.hidden_size))
    h = m.hidden_size
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    d = m.kv_channels or h // heads
    attn = h * (heads * d + 2 * groups * d) + heads * d * h + 2 * h
    if m.add_qkv_bias:
        attn += heads * d + 2 * groups * d
    if m.qk_layernorm:
        attn += 2 * d
    dense = 3 * h * m.ffn_hidden_size
    expert = 3 * h * moe.ffn_hidden_size
    shared = 3 * h * moe.shared_expert_ffn_hidden_size + (h if moe.shared_expert_gate else 0)
    if is_moe:
        from megamoe.moe.routers import ROUTERS

        extra_total, extra_active = ROUTERS[moe.router].extra_parameters(moe, h, vocab_size)
        return (attn + moe.num_experts * h + moe.num_experts * expert + shared + extra_total
                + 2 * norm_total,
                attn + moe.num_experts * h + moe.topk * expert + shared + extra_active
                + 2 * norm_active)
    return attn + dense + 2 * norm_total, attn + dense + 2 * norm_active
