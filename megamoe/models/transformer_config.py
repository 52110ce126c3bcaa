"""The Megatron `TransformerConfig` settings every megamoe family shares: shapes, parallel
sizes, the MoE keys Megatron reads, precision, and the fusions and kernels that CPU runs must
avoid. Each family adds its architecture (norm, activation, biases) in its own
`transformer_config` (megamoe.models.lm.model, megamoe.models.vit.model).
"""

from __future__ import annotations

import torch

from megamoe.specs.gpt_moe import moe_layer_pattern

AUX_LOSS_TYPES = {"switch": "aux_loss", "sequence": "seq_aux_loss", "global": "global_aux_loss"}


def _megatron_layer_freq(num_layers: int, layer_freq, num_experts: int):
    pattern = moe_layer_pattern(num_layers, layer_freq, num_experts)
    return 1 if all(pattern) or not num_experts else [int(x) for x in pattern]


def recompute_options(m) -> dict:
    """Megatron's activation-recompute fields from `model.recompute_*`. Refused here (the
    device is known): modules that need Transformer Engine, `mlp` on CPU (it hung in a trial)
    and `mlp` over MoR LoRA adapters of the MLP (selected per recursion step, not re-selected
    when Megatron re-runs the MLP)."""
    if m.recompute_granularity is None:
        return {}
    if m.recompute_granularity == "full":
        return {"recompute_granularity": "full", "recompute_method": m.recompute_method,
                "recompute_num_layers": m.recompute_num_layers}
    from megamoe.config.errors import fail

    if "layernorm" in m.recompute_modules:
        fail("model.recompute_modules", "'layernorm' needs Transformer Engine's norms; "
             "megamoe's layers use their own norms (recompute 'core_attn', 'moe' or "
             "'shared_experts', or full recompute)")
    if ("mlp" in m.recompute_modules and m.mor.enabled and m.mor.lora_rank
            and {"fc1", "fc2"} & set(m.mor.lora_targets)):
        fail("model.recompute_modules", "'mlp' would re-run the MoR pool's dense MLPs without "
             "their recursion's LoRA adapters (model.mor.lora_targets fc1/fc2)")
    if "mlp" in m.recompute_modules and not torch.cuda.is_available():
        fail("model.recompute_modules", "'mlp' is not supported on CPU (use full recompute)")
    return {"recompute_granularity": "selective", "recompute_modules": list(m.recompute_modules)}


def shared_settings(cfg, dims, *, sequence_parallel: bool, dtype: torch.dtype,
                    num_experts_override: int | None = None) -> dict:
    """TransformerConfig keyword arguments from `model`, `model.moe` and the layout `dims`."""
    m, moe = cfg.model, cfg.model.moe
    num_experts = moe.num_experts if num_experts_override is None else num_experts_override
    aux = moe.aux_loss_coeff if num_experts else 0.0
    return dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        layernorm_epsilon=m.norm_epsilon,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        # Megatron's initialisation also marks TP-split parameters (`tensor_model_parallel`,
        # `partition_dim`), which the gradient norm and the optimizer rely on; megamoe.models.init
        # then overwrites every value with the layout-independent global initialisation.
        perform_initialization=True,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=dims.tensor,
        pipeline_model_parallel_size=dims.pipeline,
        virtual_pipeline_model_parallel_size=dims.virtual_pipeline,
        expert_model_parallel_size=dims.expert,
        expert_tensor_parallel_size=dims.expert_tensor_size,
        sequence_parallel=sequence_parallel and dims.tensor > 1,
        num_moe_experts=num_experts or None,
        moe_router_topk=moe.topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size if num_experts else None,
        moe_router_score_function=moe.score_function,
        moe_router_pre_softmax=moe.topk == 1,   # Megatron's check; megamoe's router selects
        moe_router_load_balancing_type=AUX_LOSS_TYPES[moe.aux_loss_type] if aux > 0 else "none",
        moe_aux_loss_coeff=aux,
        moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_token_drop_policy=moe.drop_policy,
        moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
        moe_token_dispatcher_type=moe.token_dispatcher,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or None,
        moe_shared_expert_gate=moe.shared_expert_gate,
        moe_router_dtype="fp32",
        # a list tells Megatron's sharded state dict that MoE and dense layers alternate
        moe_layer_freq=_megatron_layer_freq(m.num_layers, moe.layer_freq, num_experts),
        moe_grouped_gemm=False,
        calculate_per_token_loss=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        cross_entropy_loss_fusion=False,
        # gloo matches point-to-point messages between two ranks in posting order; Megatron's
        # batched p2p posts send_prev before send_next, which swaps activations and gradients
        # when both neighbours are the same rank (PP=2, interleaved). The unbatched path keeps
        # the two directions on separate groups.
        batch_p2p_comm=torch.cuda.is_available(),
    )
