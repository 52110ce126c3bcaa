"""Config fields shared by the Hugging Face families: what each cannot express, the config.json
fields of transformers' MoE decoders, and megamoe overrides read back from them.

Problems are lines "field: reason"; a family expresses a config exactly when it has none.
"""

from __future__ import annotations

from megamoe.checkpoint.hf_layout import DecoderShape


def renormalize(moe) -> bool:
    """`model.moe.renormalize` (the k selected weights sum to 1); True where the schema has no
    such field (Megatron's top-k router renormalised)."""
    return bool(getattr(moe, "renormalize", True)) and moe.topk > 1   # top-1 keeps p


def renormalize_overrides(norm_topk_prob: bool, where: str) -> list[str]:
    """The override for an HF `norm_topk_prob`; refused when this megamoe cannot switch it off."""
    from megamoe.config.schema import MoEConfig

    if "renormalize" in MoEConfig.__dataclass_fields__:
        return [f"model.moe.renormalize={str(bool(norm_topk_prob)).lower()}"]
    if not norm_topk_prob:
        raise ValueError(f"{where}: norm_topk_prob false; megamoe's top-k router renormalises "
                         "the selected probabilities")
    return []


# ---- what transformers' families cannot express (the remote code's: hf_megamoe.problems) ------

def transformers_problems(cfg) -> list[str]:
    """What none of transformers' MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE) expresses."""
    moe, bad = cfg.model.moe, []
    mor = getattr(cfg.model, "mor", None)
    if mor is not None and mor.enabled:
        bad.append("model.mor.enabled: transformers' MoE families have no recursion block "
                   "(megamoe's remote code has)")
    bad += modality_norm_problem(cfg)
    if not moe.num_experts:
        bad.append("model.moe.num_experts: 0 (a dense model) is not an MoE family")
        return bad
    if moe.router != "topk":
        bad.append(f"model.moe.router: {moe.router!r}; transformers' MoE families route top k")
    if moe.capacity_factor is not None:
        bad.append("model.moe.capacity_factor: transformers' MoE families are dropless "
                   "(megamoe's remote code drops)")
    if moe.score_function != "softmax":
        bad.append(f"model.moe.score_function: {moe.score_function!r}; transformers' MoE "
                   "families weight experts by softmax")
    if getattr(moe, "loss_free_bias_rate", 0.0) > 0:
        bad.append("model.moe.loss_free_bias_rate: transformers' MoE families have no "
                   "selection bias")
    return bad


def modality_norm_problem(cfg) -> list[str]:
    """Neither transformers nor megamoe's remote code has the expert adaptive norm yet."""
    kind = getattr(cfg.model, "modality_norm", "none")
    if kind == "none":
        return []
    return [f"model.modality_norm: {kind!r}; no Hugging Face model has the per-modality "
            "modulation of the norms"]


def pattern_problem(cfg, family: str) -> list[str]:
    if all(DecoderShape.from_config(cfg).moe_layers):
        return []
    return [f"model.moe.layer_freq: {cfg.model.moe.layer_freq!r}; {family} has an MoE FFN in "
            "every layer"]


# ---- config.json -------------------------------------------------------------------------------

def decoder_config(cfg, vocab_size: int) -> dict:
    """The fields transformers' Mixtral, Qwen2-MoE and Qwen3-MoE configs share."""
    m, moe = cfg.model, cfg.model.moe
    s = DecoderShape.from_config(cfg)
    return {
        "vocab_size": vocab_size, "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.groups, "head_dim": s.head_dim,
        "hidden_act": "silu", "rms_norm_eps": m.norm_epsilon,
        # megamoe.models.lm hands Megatron int(rotary_base)
        "rope_parameters": {"rope_type": "default", "rope_theta": float(int(m.rotary_base))},
        "max_position_embeddings": m.seq_length, "tie_word_embeddings": m.tie_embeddings,
        "attention_dropout": 0.0, "initializer_range": m.init_method_std,
        "num_experts_per_tok": moe.topk, "router_aux_loss_coef": moe.aux_loss_coeff,
        "output_router_logits": False, "use_cache": True, "dtype": "float32",
    }


def qwen_layer_fields(cfg) -> dict:
    """Qwen2/3-MoE's dense layers: `mlp_only_layers` lists them (decoder_sparse_step 1)."""
    moe_layers = DecoderShape.from_config(cfg).moe_layers
    return {"decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, x in enumerate(moe_layers) if not x]}


# ---- back to megamoe ---------------------------------------------------------------------------

def rope_theta(c, where: str) -> float:
    rope = dict(getattr(c, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(c, "rope_theta", None))
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{where}: rope_parameters.rope_type {rope['rope_type']!r}; megamoe's "
                         "RoPE is the unscaled default")
    if theta is None or not float(theta).is_integer():
        raise ValueError(f"{where}: rope_theta {theta!r}; megamoe needs a whole number")
    return float(theta)


def decoder_overrides(c, where: str, *, qk_norm: bool = False, norm_topk_prob: bool = True
                      ) -> tuple[list[str], int, int, int]:
    """Overrides from the fields of an HF config object the families share; also (H, G, d)."""
    if c.hidden_act != "silu":
        raise ValueError(f"{where}: hidden_act {c.hidden_act!r}; megamoe's SwiGLU uses silu")
    theta = rope_theta(c, where)
    heads = c.num_attention_heads
    groups = c.num_key_value_heads or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    return [
        f"model.num_layers={c.num_hidden_layers}", f"model.hidden_size={c.hidden_size}",
        f"model.num_attention_heads={heads}", f"model.num_query_groups={groups}",
        f"model.kv_channels={head_dim}", f"model.vocab_size={c.vocab_size}",
        f"model.norm_epsilon={float(c.rms_norm_eps)!r}", f"model.rotary_base={theta!r}",
        f"model.tie_embeddings={str(bool(c.tie_word_embeddings)).lower()}",
        f"model.init_method_std={float(c.initializer_range)!r}",
        f"model.qk_layernorm={str(qk_norm).lower()}",
        f"model.moe.topk={c.num_experts_per_tok}", "model.moe.router=topk",
        "model.moe.score_function=softmax", "model.moe.capacity_factor=null",
        f"model.moe.aux_loss_coeff={float(c.router_aux_loss_coef)!r}",
        *renormalize_overrides(norm_topk_prob, where),
    ], heads, groups, head_dim


def qwen_moe_layers(c, where: str) -> tuple[bool, ...]:
    """Which layers of a Qwen2/3-MoE config are MoE (as transformers builds them)."""
    dense = set(c.mlp_only_layers or [])
    moe_layers = tuple(i not in dense and (i + 1) % c.decoder_sparse_step == 0
                       for i in range(c.num_hidden_layers))
    if not any(moe_layers):
        raise ValueError(f"{where}: decoder_sparse_step / mlp_only_layers leave no MoE layer")
    return moe_layers


def layer_freq_override(moe_layers) -> str:
    pattern = [int(x) for x in moe_layers]
    return "model.moe.layer_freq=" + ("1" if all(pattern) else str(pattern))
