"""The bidirectional encoder block of the `vit` family: pre-LN layers as in ViT and V-MoE —
LayerNorm with bias, attention without a mask, biased linears, a GELU MLP (dense) or megamoe's
MoE layer with any router that supports the task.

Megatron-Core 0.16's own ViT layer spec is causal (it was written for the LLaVA encoder path)
and its `CLIPViTModel` does not construct on CPU, so the layers come from megamoe's decoder
spec (megamoe.specs.gpt_moe) with LayerNorm and `AttnMaskType.no_mask`; biases and GELU are
TransformerConfig settings (megamoe.models.vit.model.transformer_config).
"""

from __future__ import annotations

from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megamoe.blocks.norms import LayerNorm
from megamoe.specs.gpt_moe import decoder_block_spec


def encoder_block_spec(tconfig, pattern: list[bool], *, router, shared_expert: bool,
                       pg_collection=None, experts: str = "sequential", fp8=None,
                       vp_stage: int | None = None, pp_rank: int | None = None,
                       modality_norm: dict | None = None) -> TransformerBlockSubmodules:
    """This pipeline stage's slice of the encoder layers (`pattern`: MoE or dense per layer);
    `modality_norm` (megamoe.specs.gpt_moe.modality_norm_options): both LayerNorms of each
    layer modulated per modality (CogVideoX's expert adaptive LayerNorm)."""
    return decoder_block_spec(tconfig, pattern, qk_layernorm=False, router=router,
                              shared_expert=shared_expert, pg_collection=pg_collection,
                              experts=experts, fp8=fp8, vp_stage=vp_stage, pp_rank=pp_rank,
                              norm=LayerNorm, mask=AttnMaskType.no_mask,
                              modality_norm=modality_norm)
