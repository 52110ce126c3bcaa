"""Decoder block spec matching Hugging Face's Mixtral block: RMSNorm, RoPE, grouped-query attention,
SwiGLU experts, no biases; options for QK-norm, qkv bias and a (gated) shared expert.

Modules are Megatron-Core's local ones (column/row-parallel linears, `DotProductAttention`,
`SequentialMLP` experts, or megamoe's grouped ones by `model.moe.experts`, FP8 ones by
`model.moe.fp8.recipe`) plus megamoe's
RMSNorm (sequence-parallel capable) and MoE layer (context, router families); with
`model.modality_norm: expert_adaln` both norms of each layer are CogVideoX's expert adaptive
norm around it (`modality_norm_options`).
"""

from __future__ import annotations

from megatron.core.models.gpt.gpt_layer_specs import get_transformer_layer_offset
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.moe.moe_layer import MoESubmodules
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from megamoe.blocks.norms import ModalityExpertAdaLN, QKRMSNorm, RMSNorm
from megamoe.moe.experts import EXPERT_MODULES, FP8Experts
from megamoe.moe.experts.linear import ExpertRowParallelLinear
from megamoe.moe.layer import MegamoeMoELayer
from megamoe.moe.routers import ROUTERS
from megamoe.moe.routers.diff_moe import DiffMoELayer, DiffMoERouter
from megamoe.moe.routers.soft import SoftRouter
from megamoe.moe.soft_layer import SoftMoELayer

# families whose experts do not see the tokens themselves need their own MoE layer
MOE_LAYERS = {SoftRouter: SoftMoELayer, DiffMoERouter: DiffMoELayer}


def _mlp_submodules() -> MLPSubmodules:
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def attention_spec(qk_layernorm: bool, mask: AttnMaskType = AttnMaskType.causal) -> ModuleSpec:
    """Self-attention, causal for decoders; `AttnMaskType.no_mask` for bidirectional encoders
    (Megatron's local softmax then applies no mask when the layer gets none)."""
    qk_norm = QKRMSNorm if qk_layernorm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": mask},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=DotProductAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def _expert_submodules() -> MLPSubmodules:
    """Experts' linears: fc2 may take a bias (megamoe.moe.experts.linear)."""
    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=ExpertRowParallelLinear)


def experts_spec(experts: str, fp8=None) -> ModuleSpec:
    """`experts`: a key of `EXPERT_MODULES` (`model.moe.experts`); `fp8`: `model.moe.fp8`, whose
    recipe (unless none) makes the experts `FP8Experts` over that back end."""
    if fp8 is not None and fp8.recipe != "none":
        return ModuleSpec(module=FP8Experts, params={"fp8": fp8, "grouped": experts == "grouped"},
                          submodules=_expert_submodules())
    return ModuleSpec(module=EXPERT_MODULES[experts], submodules=_expert_submodules())


def moe_spec(router, shared_expert: bool, pg_collection,
             experts: str = "sequential", fp8=None) -> ModuleSpec:
    """`router`: a family key of `ROUTERS` or a factory from `router_builder`; `experts`,
    `fp8`: see `experts_spec`. The MoE layer receives its process groups explicitly
    (Megatron's TransformerLayer only forwards them to the MoE classes it knows by name)."""
    router_cls = ROUTERS[router] if isinstance(router, str) else getattr(router, "func", router)
    return ModuleSpec(
        module=MOE_LAYERS.get(router_cls, MegamoeMoELayer),
        params={"pg_collection": pg_collection},
        submodules=MoESubmodules(
            experts=experts_spec(experts, fp8),
            shared_experts=(
                ModuleSpec(module=SharedExpertMLP, submodules=_mlp_submodules())
                if shared_expert else None
            ),
            router=ROUTERS[router] if isinstance(router, str) else router,
        ),
    )


def modality_norm_options(model_cfg, timestep_dim: int | None = None) -> dict | None:
    """The `modality_norm` argument of `layer_spec` for `model.modality_norm` (None: plain
    norms). `timestep_dim`: the width of the batches' timestep embedding (the context's
    `timestep_emb_BD`), None when they carry none (then learned per-modality scale/shift)."""
    if model_cfg.modality_norm == "none":
        return None
    assert model_cfg.modality_norm == "expert_adaln", model_cfg.modality_norm
    return {"num_modalities": model_cfg.num_modalities, "timestep_dim": timestep_dim}


def layer_norm_spec(norm, modality_norm: dict | None, pg_collection):
    """A layer's input/pre-MLP norm: `norm` itself, or `ModalityExpertAdaLN` around it."""
    if modality_norm is None:
        return norm
    return ModuleSpec(module=ModalityExpertAdaLN,
                      params={"norm": norm, "pg_collection": pg_collection, **modality_norm})


def layer_spec(is_moe: bool, *, qk_layernorm: bool, router, shared_expert: bool,
               pg_collection=None, experts: str = "sequential", fp8=None, norm=RMSNorm,
               mask: AttnMaskType = AttnMaskType.causal,
               modality_norm: dict | None = None) -> ModuleSpec:
    """A pre-norm layer: `norm` → attention (`mask`) → residual → `norm` → MLP or MoE →
    residual. Linear biases and the activation come from the TransformerConfig.
    `modality_norm` (`modality_norm_options`): both norms modulated per modality."""
    mlp = (moe_spec(router, shared_expert, pg_collection, experts, fp8) if is_moe
           else ModuleSpec(module=MLP, submodules=_mlp_submodules()))
    layer_norm = layer_norm_spec(norm, modality_norm, pg_collection)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=layer_norm,
            self_attention=attention_spec(qk_layernorm, mask),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=layer_norm,
            mlp=mlp,
            mlp_bda=get_bias_dropout_add,
        ),
    )


def moe_layer_pattern(num_layers: int, layer_freq, num_experts: int) -> list[bool]:
    """Which layers are MoE: every `layer_freq`-th (layer 0 included), or an explicit 0/1 list."""
    if num_experts == 0:
        return [False] * num_layers
    if isinstance(layer_freq, int):
        return [i % layer_freq == 0 for i in range(num_layers)]
    return [bool(x) for x in layer_freq]


def decoder_block_spec(tconfig, pattern: list[bool], *, qk_layernorm: bool, router,
                       shared_expert: bool, pg_collection=None, experts: str = "sequential",
                       fp8=None, vp_stage: int | None = None, pp_rank: int | None = None,
                       norm=RMSNorm, mask: AttnMaskType = AttnMaskType.causal,
                       modality_norm: dict | None = None) -> TransformerBlockSubmodules:
    """The block spec of this pipeline stage (and virtual stage): its slice of the layers;
    layers in `fp8.keep_high_precision_layers` keep high-precision experts (`norm`, `mask`,
    `modality_norm`: see `layer_spec`; megamoe.specs.vit passes the encoder's). The final norm
    stays plain `norm`."""
    specs = [layer_spec(m, qk_layernorm=qk_layernorm, router=router,
                        shared_expert=shared_expert, pg_collection=pg_collection,
                        experts=experts,
                        fp8=None if fp8 is None or fp8.keeps(i, len(pattern)) else fp8,
                        norm=norm, mask=mask, modality_norm=modality_norm)
             for i, m in enumerate(pattern)]
    n_local = get_num_layers_to_build(tconfig, vp_stage=vp_stage, pp_rank=pp_rank)
    offset = get_transformer_layer_offset(tconfig, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + n_local],
                                      layer_norm=norm)
