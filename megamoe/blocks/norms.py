"""RMSNorm and LayerNorm whose parameters Megatron can reduce across tensor-parallel ranks under
sequence parallelism.

Megatron's local spec wraps torch's norm, which refuses sequence parallelism. With SP each TP rank
normalises a different slice of the sequence, so the weight gradient is a partial sum: marking the
weight `sequence_parallel` makes Megatron's `finalize_model_grads` all-reduce it over TP.
LayerNorm (with bias, as ViT and DiT use it) marks both of its parameters.

`ModalityExpertAdaLN` wraps either norm with CogVideoX's per-modality modulation, read from the
bound context (megamoe.blocks.context).

Weight decay: Megatron (and megamoe's DeepSpeed groups) exempt biases and 1-D tensors, which
catches every plain norm parameter. The per-modality shift and scale are norm parameters too but
2-D ([M, D]); they carry `NO_WEIGHT_DECAY` and `skips_weight_decay` is the one rule both engines
apply.

Shapes: S sequence (this rank's slice under SP), B batch, D width, C timestep-embedding width,
M modalities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig

from megamoe.blocks.context import current_context

NO_WEIGHT_DECAY = "megamoe_no_weight_decay"     # a parameter attribute (module docstring)


def skips_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, 1-D tensors and parameters marked `NO_WEIGHT_DECAY` get no weight decay."""
    return param.ndim == 1 or name.endswith(".bias") or getattr(param, NO_WEIGHT_DECAY, False)


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


class ModalityExpertAdaLN(MegatronModule):
    """CogVideoX's expert adaptive LayerNorm (Yang et al., arXiv 2408.06072; papers.md §9):
    ONE shared norm (`norm`: RMSNorm in the lm decoder, LayerNorm in ViT blocks), then each
    token is modulated by its modality m's parameters: x̂ = norm(x)·(1 + scale_m) + shift_m.

    - `timestep_dim` C set: (shift_m, scale_m) = Linear_m(SiLU(temb)) per sample, all M
      modalities from one Linear C → 2·M·D (CogVideoX's Linear_{512→6D} without the gates);
    - `timestep_dim` None: learned per-modality vectors shift, scale [M, D].
    The modulation starts at zero (`adaln_zero_*`: megamoe.models.init zero-fills them), so
    training starts from the plain norm. CogVideoX's gates scale the block's residual branches,
    not the norm: they are out of scope here.

    Modality ids come from the bound context ([B, S], this rank's sequence slice under SP).
    The parameters are replicated over TP while each TP rank sees part of the sequence under SP:
    they carry Megatron's `sequence_parallel` mark, so `finalize_model_grads` sums their
    gradients over TP, as for the norm weights above."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, *,
                 norm=RMSNorm, num_modalities: int = 2, timestep_dim: int | None = None,
                 pg_collection=None, **_):
        super().__init__(config)
        self.norm = norm(config, hidden_size, eps)
        M, D = num_modalities, hidden_size
        self.num_modalities, self.timestep_dim = M, timestep_dim
        dtype = config.params_dtype
        if timestep_dim:
            # rows ordered [m, (shift, scale), D]
            self.adaln_zero_weight = torch.nn.Parameter(
                torch.zeros(M * 2 * D, timestep_dim, dtype=dtype))
            self.adaln_zero_bias = torch.nn.Parameter(torch.zeros(M * 2 * D, dtype=dtype))
            modulation = (self.adaln_zero_weight, self.adaln_zero_bias)
        else:
            self.adaln_zero_shift = torch.nn.Parameter(torch.zeros(M, D, dtype=dtype))
            self.adaln_zero_scale = torch.nn.Parameter(torch.zeros(M, D, dtype=dtype))
            modulation = (self.adaln_zero_shift, self.adaln_zero_scale)
            for p in modulation:
                setattr(p, NO_WEIGHT_DECAY, True)
        for p in modulation:
            p.sequence_parallel = config.sequence_parallel
        tp = getattr(pg_collection, "tp", None)
        assert tp is not None or not config.sequence_parallel, "SP needs the TP group"
        if tp is not None:
            self.tp_group = tp      # Megatron's sharded_state_dict reads it (replicas over TP)
        self.sp_rank, self.sp_size = ((tp.rank(), tp.size()) if config.sequence_parallel
                                      else (0, 1))

    def modality_ids(self, S: int, B: int) -> torch.Tensor:
        """[S, B] modality ids of this rank's tokens, from the bound context."""
        context = current_context()
        if context.modality_ids_BS is None:
            raise ValueError("model.modality_norm 'expert_adaln' needs modality ids in the "
                             "batches (lm: data.synthetic_modalities; vlm: its data), the "
                             "context has none")
        modality_T = context.tokens("modality_ids_BS", self.sp_rank, self.sp_size)
        assert modality_T.numel() == S * B, (modality_T.shape, S, B)
        return modality_T.view(S, B).long()

    def modulation(self, modality_SB: torch.Tensor, B: int):
        """(shift, scale) [S, B, D] in fp32 of every token."""
        temb_BC = current_context().timestep_emb_BD
        if (temb_BC is not None) != bool(self.timestep_dim):
            built = (f"conditioned on a timestep embedding (width {self.timestep_dim})"
                     if self.timestep_dim else "with per-modality scale and shift")
            raise ValueError(f"model.modality_norm 'expert_adaln': built {built}, but the "
                             f"batch {'has no' if temb_BC is None else 'has a'} timestep "
                             "embedding (lm: data.synthetic_timesteps)")
        if temb_BC is None:
            return (self.adaln_zero_shift.float()[modality_SB],
                    self.adaln_zero_scale.float()[modality_SB])
        assert temb_BC.shape == (B, self.timestep_dim), (temb_BC.shape, B, self.timestep_dim)
        temb_BC = temb_BC.to(modality_SB.device).float()
        mod_BM2D = F.linear(F.silu(temb_BC), self.adaln_zero_weight.float(),
                            self.adaln_zero_bias.float()).view(B, self.num_modalities, 2, -1)
        sample_1B = torch.arange(B, device=modality_SB.device)[None, :]
        mod_SB2D = mod_BM2D[sample_1B, modality_SB]
        return mod_SB2D[:, :, 0], mod_SB2D[:, :, 1]

    def forward(self, x_SBD: torch.Tensor) -> torch.Tensor:
        S, B, _ = x_SBD.shape
        modality_SB = self.modality_ids(S, B).to(x_SBD.device)
        shift_SBD, scale_SBD = self.modulation(modality_SB, B)
        y_SBD = self.norm(x_SBD.float())
        return (y_SBD * (1 + scale_SBD) + shift_SBD).to(x_SBD.dtype)
