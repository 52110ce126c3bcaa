"""RMSNorm and LayerNorm whose parameters Megatron can reduce across tensor-parallel ranks under
sequence parallelism.

Megatron's local spec wraps torch's norm, which refuses sequence parallelism. With SP each TP rank
normalises a different slice of the sequence, so the weight gradient is a partial sum: marking the
weight `sequence_parallel` makes Megatron's `finalize_model_grads` all-reduce it over TP.
LayerNorm (with bias, as ViT and DiT use it) marks both of its parameters.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(MegatronModule):
    """y = x / sqrt(mean(x²) + eps) · w  (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class QKRMSNorm(RMSNorm):
    """RMSNorm over the head dimension of queries/keys (QK-norm). Each TP rank sees its own heads,
    so the weight's gradient is a partial sum: Megatron sums `q_layernorm`/`k_layernorm` grads over
    TP when `config.qk_layernorm` is set, so no sequence-parallel mark is needed."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(config, hidden_size, eps)
        self.weight.sequence_parallel = False


class LayerNorm(MegatronModule):
    """y = (x − mean) / sqrt(var + eps) · w + b (Ba et al. 2016), computed in fp32; torch's
    kernel, with both parameters marked for the sequence-parallel gradient reduction."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(config)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        for p in (self.weight, self.bias):
            p.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], self.weight.float(),
                                           self.bias.float(), self.eps)
        return y.to(x.dtype)
