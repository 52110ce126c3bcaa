"""The MoE language model: Megatron's `GPTModel` built from megamoe's decoder spec.

`transformer_config` translates megamoe's typed config into Megatron's `TransformerConfig`;
`build_lm` returns the model chunks of this rank (one per virtual pipeline stage), each an
`LMModel` whose forward takes the micro-batch's `Context` (`lm_context`) and binds it for its
layers for the duration of the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megamoe.blocks.context import Context, bind
from megamoe.blocks.norms import RMSNorm
from megamoe.blocks.recompute import ContextTransformerBlock
from megamoe.data.synthetic_context import context_fields
from megamoe.fp8.backends import row_multiple
from megamoe.specs.gpt_moe import decoder_block_spec, moe_layer_pattern
from megamoe.models.vocab import mask_padded_logits, padded_vocab_size
from megamoe.moe.routers import router_builder

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
             "megamoe's layers use their own RMSNorm (recompute 'core_attn', 'moe' or "
             "'shared_experts', or full recompute)")
    if ("mlp" in m.recompute_modules and m.mor.enabled and m.mor.lora_rank
            and {"fc1", "fc2"} & set(m.mor.lora_targets)):
        fail("model.recompute_modules", "'mlp' would re-run the MoR pool's dense MLPs without "
             "their recursion's LoRA adapters (model.mor.lora_targets fc1/fc2)")
    if "mlp" in m.recompute_modules and not torch.cuda.is_available():
        fail("model.recompute_modules", "'mlp' is not supported on CPU (use full recompute)")
    return {"recompute_granularity": "selective", "recompute_modules": list(m.recompute_modules)}


def transformer_config(cfg, dims, *, sequence_parallel: bool, dtype: torch.dtype,
                       num_experts_override: int | None = None) -> TransformerConfig:
    m, moe = cfg.model, cfg.model.moe
    num_experts = moe.num_experts if num_experts_override is None else num_experts_override
    aux = moe.aux_loss_coeff if num_experts else 0.0
    tconfig = TransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        kv_channels=m.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        qk_layernorm=m.qk_layernorm,
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
        **recompute_options(m),
    )
    if num_experts and row_multiple(moe.fp8, moe.experts == "grouped",
                                    torch.cuda.is_available()) > 1:
        # each expert's rows a multiple of 16 (the grouped FP8 kernel's): Megatron's all-to-all
        # dispatcher routes extra tokens with probability 0 (`pad_routing_map`); set after
        # construction because its check wants Transformer Engine's `fp8` field
        tconfig.moe_router_padding_for_quantization = True
    return tconfig


def lm_context(batch: dict, cfg, step: int | None = None) -> Context:
    """The language model's context of a micro-batch (built on every pipeline stage): the
    loader's global sample indices, labels, the batch's modality and sequence ids if it has
    them, and the config's synthetic modality ids / timesteps (megamoe.data.synthetic_context);
    `step`: optimizer steps taken before this batch."""
    fields = {"sample_index_B": batch.get("sample_index"),
              "modality_ids_BS": batch.get("modality_ids"),
              "sequence_ids_BS": batch.get("sequence_ids"), "labels_BS": batch.get("labels")}
    fields.update(context_fields(batch["tokens"], cfg.data, cfg.model.hidden_size))
    return Context(**fields, step=step)


def _empty_block_spec() -> TransformerBlockSubmodules:
    return TransformerBlockSubmodules(layer_specs=[], layer_norm=RMSNorm)


class LMModel(GPTModel):
    """Megatron's GPTModel with the decoder megamoe's LM builder chooses (`build_decoder`:
    megamoe's `ContextTransformerBlock`, whose full recompute keeps each micro-batch's context,
    or the Mixture-of-Recursions decoder) and a forward that binds the `context` it is given
    for its layers while it runs: the model owns the scope, not the training step.

    GPTModel constructs Megatron's TransformerBlock itself; it gets an empty one (no layers,
    no parameters) and the constructor puts the chosen decoder in its place, so every model is
    complete when it is returned (nothing swaps a decoder after construction)."""

    def __init__(self, config, build_decoder, **gpt_kwargs):
        super().__init__(config=config, transformer_layer_spec=_empty_block_spec(), **gpt_kwargs)
        self.decoder = build_decoder(pre_process=self.pre_process,
                                     post_process=self.post_process,
                                     vp_stage=gpt_kwargs.get("vp_stage"))

    def forward(self, *args, context: Context | None = None, **kwargs):
        with bind(context):
            return super().forward(*args, **kwargs)


def build_lm(cfg, tconfig: TransformerConfig, pg_collection, vocab_size: int) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage) for a `vocab_size`-token
    vocabulary, padded for TP (megamoe.models.vocab); with `model.mor` the decoder is the
    Mixture-of-Recursions one (megamoe.mor.decoder)."""
    m, moe = cfg.model, cfg.model.moe
    padded_vocab = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by,
                                     tconfig.tensor_model_parallel_size)
    pattern = moe_layer_pattern(m.num_layers, moe.layer_freq, tconfig.num_moe_experts or 0)
    vp = tconfig.virtual_pipeline_model_parallel_size
    pp_rank, pp_size = pg_collection.pp.rank(), pg_collection.pp.size()
    chunks = []
    for vp_stage in (range(vp) if vp else [None]):
        first = pp_rank == 0 and (vp_stage in (None, 0))
        last = pp_rank == pp_size - 1 and (vp_stage in (None, (vp or 1) - 1))
        layer_kwargs = dict(qk_layernorm=m.qk_layernorm, router=router_builder(moe, vocab_size),
                            shared_expert=bool(moe.shared_expert_ffn_hidden_size),
                            experts=moe.experts, fp8=moe.fp8)
        if m.mor.enabled:
            from megamoe.mor.decoder import build_mor_decoder

            def build_decoder(pre_process, post_process, vp_stage, kw=layer_kwargs):
                return build_mor_decoder(cfg, tconfig, pg_collection, kw, vocab_size=vocab_size,
                                         pre_process=pre_process, post_process=post_process)
        else:
            spec = decoder_block_spec(tconfig, pattern, **layer_kwargs,
                                      pg_collection=pg_collection, vp_stage=vp_stage,
                                      pp_rank=pp_rank)

            def build_decoder(pre_process, post_process, vp_stage, spec=spec):
                return ContextTransformerBlock(config=tconfig, spec=spec, pre_process=pre_process,
                                               post_process=post_process,
                                               pg_collection=pg_collection, vp_stage=vp_stage)
        model = LMModel(
            config=tconfig,
            build_decoder=build_decoder,
            vocab_size=padded_vocab,
            max_sequence_length=m.seq_length,
            pre_process=first,
            post_process=last,
            share_embeddings_and_output_weights=m.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(m.rotary_base),
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )
        model.unpadded_vocab_size = vocab_size
        if last:
            mask_padded_logits(model, vocab_size, pg_collection.tp.rank())
        chunks.append(model)
    mark_expert_replicas(chunks, tconfig)
    return chunks


def mark_expert_replicas(chunks, tconfig) -> None:
    """Megatron-Core 0.16 marks expert weights as expert-parallel (`allreduce=False`, reduced
    over the expert-data-parallel group) only when EP > 1. With EP = 1 and expert-TP smaller
    than TP, the TP ranks hold replicas of each expert that see different tokens, yet the
    gradients were reduced over the dense DP group only, missing those replicas (expert grads
    off by ~50% in TP2·ETP1 against one process). Mark them so DDP and the optimizer treat
    them as expert parameters."""
    etp = tconfig.expert_tensor_parallel_size or tconfig.tensor_model_parallel_size
    if tconfig.expert_model_parallel_size > 1 or etp == tconfig.tensor_model_parallel_size:
        return
    for layer in moe_layers(chunks):
        for param in layer.experts.parameters():
            param.allreduce = False


def moe_layers(chunks) -> list:
    from megamoe.moe.layer import MegamoeMoELayer

    return [mod for c in chunks for mod in c.modules() if isinstance(mod, MegamoeMoELayer)]


def non_causal_routers(chunks) -> list[str]:
    return sorted({type(layer.router).__name__ for layer in moe_layers(chunks)
                   if not layer.router.is_causal()})
