"""megamoe's class-conditional diffusion transformer (the `dit` family) as a diffusers model: what
megamoe's Megatron DiT (megamoe.models.dit.model) computes in eval mode, for pipeline folders
written by `megamoe convert RUN --to diffusers`. Shipped in the folder's `transformer/` next to
routers_megamoe.py (megamoe's eval-mode routers, copied unchanged); imports torch and diffusers
only. Loaded by `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`.

forward(hidden_states [B, C, H, W] (x_t in [−1, 1] units), timestep [B] (the scheduler's units:
σ·T for rectified flow, the DDPM step), class_labels [B] (`num_classes` = the null class))
→ the prediction [B, C, H, W] (v = ε − x, or ε).

- Patch embedding: patch_size² patches in row-major order, each flattened channel-major
  (c, dy, dx), a biased linear to D, plus fixed 2-D sin-cos positions (the first D/2 channels
  encode the row, the rest the column, [sin, cos] of p·10000^(−i/(D/4))). This restates
  megamoe.blocks.embeddings, which the folder cannot import.
- Conditioning c [B, D] = MLP(sinusoid(t)) + table[y]: the sinusoid is [cos, sin] of
  t·10000^(−i/(F/2)) (DiT's order), the MLP Linear → SiLU → Linear.
- adaLN-Zero block: (shift₁, scale₁, gate₁, shift₂, scale₂, gate₂) = W·SiLU(c) + b;
  x += gate₁ ⊙ Attn(LN(x)(1 + scale₁) + shift₁); x += gate₂ ⊙ FFN(LN(x)(1 + scale₂) + shift₂).
  LN without affine parameters, in fp32; attention with biased q, k, v, o projections (query
  head h reads KV head h // (H/G)), softmax(q·kᵀ/√d), no mask; FFN a biased GELU MLP or, in MoE
  layers, Σ_e p_e·E_e(x) over the routed biased GELU experts (+ an unbiased GELU shared expert),
  routed by megamoe's eval-mode router family over the tokens of the call in Megatron's [S, B]
  order (token t = s·B + b), or per image for expert choice with the `sequence` selection group
  (EC-DiT); Diff-MoE's calibrated experts add Σ_topk s_e·x.
- Final layer: (shift, scale) = W·SiLU(c) + b; Linear(LN(x)(1 + scale) + shift) → P²·C per
  token, unpatchified.

Legend: B images, S tokens, D hidden, H query heads, G KV heads, d head dim, T = S·B, E experts,
F frequency embedding size, P patch side, C channels.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from .routers_megamoe import RoutingInputs, build_router


@dataclass
class MegamoeDiTOutput(BaseOutput):
    sample: torch.Tensor


def patchify(images_BCHW, patch: int):
    B, C, H, W = images_BCHW.shape
    x = images_BCHW.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


def unpatchify(patches_BNP, patch: int, channels: int):
    B, N, _ = patches_BNP.shape
    side = math.isqrt(N)
    x = patches_BNP.reshape(B, side, side, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, channels, side * patch, side * patch)


def sincos_2d(side: int, dim: int):
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64),
                                torch.arange(side, dtype=torch.float64), indexing="ij")

    def encode(pos):
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


def timestep_sinusoid(t_B, dim: int, max_period: float = 10000.0):
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t_B.device) / half)
    angle_BH = t_B.float()[:, None] * omega[None]
    return torch.cat([angle_BH.cos(), angle_BH.sin()], dim=-1)


def plain_norm(x, eps: float):
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, frequency_size: int, hidden: int):
        super().__init__()
        self.frequency_size = frequency_size
        self.linear_1, self.linear_2 = nn.Linear(frequency_size, hidden), nn.Linear(hidden, hidden)

    def forward(self, t_B):
        freq_BF = timestep_sinusoid(t_B, self.frequency_size).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(freq_BF)))


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        D, d = c.hidden_size, c.head_dim
        self.H, self.G, self.d = c.num_attention_heads, c.num_key_value_heads, d
        self.q_proj, self.k_proj = nn.Linear(D, self.H * d), nn.Linear(D, self.G * d)
        self.v_proj, self.o_proj = nn.Linear(D, self.G * d), nn.Linear(self.H * d, D)

    def forward(self, x_BSD):
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.H, self.d).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, self.G, self.d).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.G, self.d).transpose(1, 2)
        k = k.repeat_interleave(self.H // self.G, dim=1)
        v = v.repeat_interleave(self.H // self.G, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.d)
        out = scores.float().softmax(dim=-1).to(v.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.H * self.d))


class MLP(nn.Module):
    def __init__(self, hidden: int, ffn: int, bias: bool = True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(hidden, ffn, bias=bias), nn.Linear(ffn, hidden, bias=bias)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Experts(nn.Module):
    """E biased GELU experts stored fused: fc1_weight [E, F, D], fc1_bias [E, F],
    fc2_weight [E, D, F], fc2_bias [E, D]."""

    def __init__(self, c):
        super().__init__()
        E, D, Fe = c.num_experts, c.hidden_size, c.moe_intermediate_size
        self.fc1_weight = nn.Parameter(torch.zeros(E, Fe, D))
        self.fc1_bias = nn.Parameter(torch.zeros(E, Fe))
        self.fc2_weight = nn.Parameter(torch.zeros(E, D, Fe))
        self.fc2_bias = nn.Parameter(torch.zeros(E, D))

    def expert_ffn(self, e: int, x_ND):
        h = F.gelu(F.linear(x_ND, self.fc1_weight[e], self.fc1_bias[e]))
        return F.linear(h, self.fc2_weight[e], self.fc2_bias[e])

    def forward(self, x_TD, probs_TE, map_TE, modulation=None):
        y_TD = torch.zeros_like(x_TD)
        for e in map_TE.any(dim=0).nonzero().flatten().tolist():
            token_N = map_TE[:, e].nonzero().flatten()
            x_ND = x_TD[token_N]
            if modulation is not None:          # Diff-MoE's expert calibration
                shift_ND, scale_ND, gate_ND = modulation(token_N, e)
                x_ND = (F.layer_norm(x_ND.float(), x_ND.shape[-1:]) * (1 + scale_ND)
                        + shift_ND).to(x_TD.dtype)
                out_ND = (self.expert_ffn(e, x_ND).float() * gate_ND).to(x_TD.dtype)
            else:
                out_ND = self.expert_ffn(e, x_ND)
            y_TD.index_add_(0, token_N, out_ND * probs_TE[token_N, e, None].to(x_TD.dtype))
        return y_TD


class MoE(nn.Module):
    def __init__(self, c, layer_idx: int):
        super().__init__()
        self.router_kind, self.per_image = c.router, c.expert_choice_per_image
        self.gate = build_router(c, layer_idx)
        self.experts = Experts(c)
        self.shared_expert = (MLP(c.hidden_size, c.shared_expert_intermediate_size, bias=False)
                              if c.shared_expert_intermediate_size else None)

    def forward(self, x_BSD, c_BD):
        B, S, D = x_BSD.shape
        x_SBD = x_BSD.transpose(0, 1)
        if self.per_image:       # EC-DiT: each image's S tokens are their own selection group
            y_SBD = torch.stack([self._mix(x_SBD[:, b], c_BD[b:b + 1]) for b in range(B)], 1)
        else:
            y_SBD = self._mix(x_SBD.reshape(S * B, D), c_BD).view(S, B, D)
        return y_SBD.transpose(0, 1)

    def _mix(self, x_TD, c_BD):
        """The routed (and shared) experts' output for the tokens x_TD of the images c_BD
        conditions, in Megatron's order."""
        ctx = RoutingInputs(batch=c_BD.shape[0], timestep_BC=c_BD)
        probs_TE, map_TE = self.gate(x_TD, ctx)
        if self.router_kind == "diff_moe":         # calibrated experts + Σ_topk s_e·x
            y_TD = self.experts(x_TD, probs_TE, map_TE, self.gate.modulation(ctx))
            y_TD = y_TD + x_TD * probs_TE.sum(dim=-1, keepdim=True).to(x_TD.dtype)
        else:
            y_TD = self.experts(x_TD, probs_TE, map_TE)
        if self.shared_expert is not None:
            y_TD = y_TD + self.shared_expert(x_TD)
        return y_TD


class DiTBlock(nn.Module):
    def __init__(self, c, layer_idx: int):
        super().__init__()
        D = c.hidden_size
        self.eps = c.norm_eps
        self.adaln_modulation = nn.Linear(D, 6 * D)
        self.attn = Attention(c)
        self.is_moe = bool(c.moe_layers[layer_idx])
        self.ffn = MoE(c, layer_idx) if self.is_moe else MLP(D, c.intermediate_size)

    def forward(self, x_BSD, c_BD):
        mod = self.adaln_modulation(F.silu(c_BD))[:, None].chunk(6, dim=-1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod
        x_BSD = x_BSD + gate1 * self.attn(modulate(plain_norm(x_BSD, self.eps), shift1, scale1))
        h_BSD = modulate(plain_norm(x_BSD, self.eps), shift2, scale2)
        out_BSD = self.ffn(h_BSD, c_BD) if self.is_moe else self.ffn(h_BSD)
        return x_BSD + gate2 * out_BSD


class FinalLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        D = c.hidden_size
        self.eps = c.norm_eps
        self.adaln_modulation = nn.Linear(D, 2 * D)
        self.proj = nn.Linear(D, c.patch_size ** 2 * c.in_channels)

    def forward(self, x_BSD, c_BD):
        shift, scale = self.adaln_modulation(F.silu(c_BD))[:, None].chunk(2, dim=-1)
        return self.proj(modulate(plain_norm(x_BSD, self.eps), shift, scale))


class MegamoeDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """megamoe's DiT / DiT-MoE in eval mode (module docstring). `router_options` holds the
    router family's option sections as megamoe's config has them."""

    @register_to_config
    def __init__(self, sample_size: int = 32, patch_size: int = 4, in_channels: int = 3,
                 num_classes: int = 10, hidden_size: int = 96, num_layers: int = 4,
                 num_attention_heads: int = 4, num_key_value_heads: int = 4, head_dim: int = 24,
                 intermediate_size: int = 384, frequency_embedding_size: int = 256,
                 norm_eps: float = 1e-6, moe_layers: list | None = None, num_experts: int = 0,
                 moe_intermediate_size: int = 0, router: str = "topk",
                 num_experts_per_tok: int = 1, score_function: str = "softmax",
                 norm_topk_prob: bool = False, shared_expert_intermediate_size: int = 0,
                 router_options: dict | None = None, loss_free_bias_rate: float = 0.0,
                 capacity_factor: float | None = None, token_drop_policy: str = "probs",
                 pad_to_capacity: bool = False, expert_choice_per_image: bool = False):
        super().__init__()
        c = types.SimpleNamespace(**{k: v for k, v in locals().items()
                                     if k not in ("self", "__class__")})
        c.moe_layers = list(moe_layers or [0] * num_layers)
        c.router_options = dict(router_options or {})
        c.num_hidden_layers = num_layers          # what routers_megamoe.py reads
        c.vocab_size = in_channels * patch_size ** 2   # Race's PLR head: a token's target
        D, self.side = hidden_size, sample_size // patch_size
        self.patch_embed = nn.Linear(in_channels * patch_size ** 2, D)
        self.timestep_embedder = TimestepEmbedder(frequency_embedding_size, D)
        self.class_embedder = nn.Embedding(num_classes + 1, D)    # the last row: null class
        self.blocks = nn.ModuleList(DiTBlock(c, i) for i in range(num_layers))
        self.final_layer = FinalLayer(c)

    def forward(self, hidden_states, timestep, class_labels, return_dict: bool = True):
        P, C = self.config.patch_size, self.config.in_channels
        B = hidden_states.shape[0]
        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1)
        if timestep.numel() == 1:
            timestep = timestep.expand(B)
        c_BD = self.timestep_embedder(timestep) + self.class_embedder(class_labels.long())
        x = hidden_states.float().to(self.patch_embed.weight.dtype)
        x_BSD = self.patch_embed(patchify(x, P))
        x_BSD = x_BSD + sincos_2d(self.side, x_BSD.shape[-1]).to(x_BSD)
        for block in self.blocks:
            x_BSD = block(x_BSD, c_BD)
        out_BCHW = unpatchify(self.final_layer(x_BSD, c_BD), P, C)
        return MegamoeDiTOutput(sample=out_BCHW) if return_dict else (out_BCHW,)
