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
from megamoe.data.synthetic_context import context_fields, timestep_embedding_width
from megamoe.fp8.backends import row_multiple
from megamoe.specs.gpt_moe import decoder_block_spec, modality_norm_options, moe_layer_pattern
from megamoe.models.transformer_config import recompute_options, shared_settings
from megamoe.models.vocab import mask_padded_logits, padded_vocab_size
from megamoe.moe.routers import router_builder

def transformer_config(cfg, dims, *, sequence_parallel: bool, dtype: torch.dtype,
                       num_experts_override: int | None = None) -> TransformerConfig:
    """The decoder's Megatron config: RMSNorm, SwiGLU, no linear biases (Mixtral's block), on
    the settings every megamoe family shares (megamoe.models.transformer_config)."""
    m, moe = cfg.model, cfg.model.moe
    num_experts = moe.num_experts if num_experts_override is None else num_experts_override
    tconfig = TransformerConfig(
        **shared_settings(cfg, dims, sequence_parallel=sequence_parallel, dtype=dtype,
                          num_experts_override=num_experts_override),
        num_query_groups=m.num_query_groups or m.num_attention_heads,
        kv_channels=m.kv_channels,
        normalization="RMSNorm",
        add_bias_linear=False,
        add_qkv_bias=m.add_qkv_bias,
        gated_linear_unit=True,
        activation_func=F.silu,
        qk_layernorm=m.qk_layernorm,
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


def build_lm(cfg, tconfig: TransformerConfig, pg_collection, vocab_size: int, *,
             model_class=None, chunk_kwargs=None) -> list[GPTModel]:
    """This rank's model chunks (one per virtual pipeline stage) for a `vocab_size`-token
    vocabulary, padded for TP (megamoe.models.vocab); with `model.mor` the decoder is the
    Mixture-of-Recursions one (megamoe.mor.decoder). A family that extends the LM (vlm) passes
    its `model_class` and `chunk_kwargs(first_stage, last_stage)`: the extra constructor
    arguments of each chunk."""
    model_class = model_class or LMModel
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
                            experts=moe.experts, fp8=moe.fp8,
                            modality_norm=modality_norm_options(
                                m, timestep_embedding_width(cfg.data, m.hidden_size)))
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
        model = model_class(
            **(chunk_kwargs(first, last) if chunk_kwargs else {}),
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
