"""The DiT block as a Megatron layer spec: adaLN-Zero (Peebles & Xie 2023, §3.2 "adaLN-Zero
block"; DiT-MoE, papers.md §6, with the MLP replaced by megamoe's MoE layer):

    (shift₁, scale₁, gate₁, shift₂, scale₂, gate₂) = W·SiLU(c) + b        W, b zero-initialised
    x ← x + gate₁ ⊙ Attn(LN(x)·(1 + scale₁) + shift₁)
    x ← x + gate₂ ⊙ FFN(LN(x)·(1 + scale₂) + shift₂)                       FFN: MLP or MoE

LN has no affine parameters; attention is bidirectional (no mask); linears are biased and the
MLP (dense, or each expert) is GELU, as ViT's (megamoe.specs.vit); a shared expert has no
biases. c [B, D] is the sample's
conditioning (timestep + class embedding), read from the bound context's `timestep_emb_BD`:
the modulation is per sample, broadcast over its tokens, so sequence parallelism (which splits
tokens) leaves it whole. Under SP each TP rank modulates its own slice of the tokens, so the
modulation's gradient is a partial sum over TP: its parameters carry Megatron's
`sequence_parallel` mark and `finalize_model_grads` sums them, as for norm weights.

`DiTLayer` is Megatron's `TransformerLayer` (its submodules, state dict and layer numbering)
with its forward written for the gated residuals; the parameter names hold `adaln_zero`, which
megamoe.models.init fills with zeros, so every block starts as the identity.

Shapes: S tokens (this rank's slice under SP), B images, D width.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from megatron.core.models.gpt.gpt_layer_specs import get_transformer_layer_offset
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.shared_experts import SharedExpertMLP
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_layer import (TransformerLayer,
                                                         TransformerLayerSubmodules)
from megatron.core.utils import make_viewless_tensor

from megamoe.blocks.context import current_context
from megamoe.specs.gpt_moe import _mlp_submodules, attention_spec, moe_spec


class PlainLayerNorm(MegatronModule):
    """LayerNorm without affine parameters (DiT's `elementwise_affine=False`): adaLN supplies
    the scale and shift. Computed in fp32."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **_):
        super().__init__(config)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def modulate(x_SBD: torch.Tensor, shift_1BD: torch.Tensor, scale_1BD: torch.Tensor):
    return x_SBD * (1 + scale_1BD) + shift_1BD


class DiTLayer(TransformerLayer):
    """A DiT block (module docstring): Megatron's layer with adaLN-Zero modulation."""

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None,
                 pg_collection=None, vp_stage=None):
        super().__init__(config, submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection,
                         vp_stage=vp_stage)
        D, dtype = config.hidden_size, config.params_dtype
        # rows: [shift₁, scale₁, gate₁, shift₂, scale₂, gate₂] × D
        self.adaln_zero_weight = torch.nn.Parameter(torch.zeros(6 * D, D, dtype=dtype))
        self.adaln_zero_bias = torch.nn.Parameter(torch.zeros(6 * D, dtype=dtype))
        for p in (self.adaln_zero_weight, self.adaln_zero_bias):
            p.sequence_parallel = config.sequence_parallel

    def modulation(self, batch: int):
        """Six [1, B, D] tensors of the bound micro-batch's conditioning."""
        c_BD = current_context().require("timestep_emb_BD", "the dit block (adaLN-Zero)")
        assert c_BD.shape[0] == batch, (c_BD.shape, batch)
        mod_B6D = F.linear(F.silu(c_BD.to(self.adaln_zero_weight.dtype)),
                           self.adaln_zero_weight, self.adaln_zero_bias)
        return mod_B6D[None].chunk(6, dim=-1)

    def forward(self, hidden_states, attention_mask=None, context=None, **_):
        """(output [S, B, D], Megatron's cross-attention `context`, unused)."""
        x_SBD = hidden_states
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(x_SBD.shape[1])
        h_SBD = modulate(self.input_layernorm(x_SBD), shift1, scale1)
        out_SBD, bias = self.self_attention(h_SBD, attention_mask=attention_mask)
        if bias is not None:
            out_SBD = out_SBD + bias
        x_SBD = x_SBD + gate1 * out_SBD
        h_SBD = modulate(self.pre_mlp_layernorm(x_SBD), shift2, scale2)
        out_SBD, bias = self.mlp(h_SBD)
        if bias is not None:
            out_SBD = out_SBD + bias
        x_SBD = x_SBD + gate2 * out_SBD
        return make_viewless_tensor(x_SBD, requires_grad=x_SBD.requires_grad,
                                    keep_graph=True), context


class UnbiasedSharedExpertMLP(SharedExpertMLP):
    """Megatron's shared expert, built without biases inside a biased block (Megatron's
    shared expert refuses biases; DiT-MoE's reference shared MLP has none either)."""

    def __init__(self, config, submodules, gate: bool, pg_collection=None):
        config = copy.copy(config)
        config.add_bias_linear = False
        super().__init__(config, submodules, gate, pg_collection)


def dit_layer_spec(is_moe: bool, *, router, shared_expert: bool, pg_collection=None,
                   experts: str = "sequential", fp8=None) -> ModuleSpec:
    """One DiT block; `experts`, `fp8`: the experts' back end (megamoe.specs.gpt_moe)."""
    mlp = (moe_spec(router, shared_expert, pg_collection, experts, fp8) if is_moe
           else ModuleSpec(module=MLP, submodules=_mlp_submodules()))
    if is_moe and shared_expert:
        mlp.submodules.shared_experts.module = UnbiasedSharedExpertMLP
    return ModuleSpec(
        module=DiTLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=PlainLayerNorm,
            self_attention=attention_spec(False, AttnMaskType.no_mask),
            pre_mlp_layernorm=PlainLayerNorm,
            mlp=mlp,
        ),
    )


def dit_block_spec(tconfig, pattern: list[bool], *, router, shared_expert: bool,
                   pg_collection=None, experts: str = "sequential", fp8=None,
                   vp_stage: int | None = None, pp_rank: int | None = None
                   ) -> TransformerBlockSubmodules:
    """This pipeline stage's slice of the DiT blocks (`pattern`: MoE or dense per layer);
    layers in `fp8.keep_high_precision_layers` keep high-precision experts. The block has no
    final norm: the model's final adaLN layer follows it."""
    specs = [dit_layer_spec(m, router=router, shared_expert=shared_expert,
                            pg_collection=pg_collection, experts=experts,
                            fp8=None if fp8 is None or fp8.keeps(i, len(pattern)) else fp8)
             for i, m in enumerate(pattern)]
    n_local = get_num_layers_to_build(tconfig, vp_stage=vp_stage, pp_rank=pp_rank)
    offset = get_transformer_layer_offset(tconfig, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + n_local],
                                      layer_norm=PlainLayerNorm)
