"""Image patch embeddings: patchify, a linear projection, an optional class token and absolute
positions (learned, or fixed 2-D sin-cos), as in ViT (Dosovitskiy et al. 2021, Eq. 1) and
V-MoE; optionally CLIP's form (Radford et al. 2021): no projection bias and a LayerNorm over
the summed embeddings. No family knowledge: the vit family puts this at the front of its encoder, the diffusion
and multimodal families reuse it. The diffusion family's conditioning embedders (timestep
sinusoid → MLP, class table with a null class; DiT, Peebles & Xie 2023) are here too.

Shapes: B images, C channels, H, W image sides, P patch side, N = (H/P)·(W/P) patches,
S tokens (N, + 1 with the class token), D model width.
"""

from __future__ import annotations

import math

import torch

from megatron.core.transformer.module import MegatronModule

from megamoe.blocks.norms import LayerNorm


def patchify(images_BCHW: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, N, C·P·P]: non-overlapping patches in row-major order (row by row, left to right),
    each flattened channel-major (c, dy, dx) — a fixed order, so a checkpoint's projection
    means the same thing in every process and in the exported model."""
    B, C, H, W = images_BCHW.shape
    x = images_BCHW.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // patch) * (W // patch), C * patch * patch)


def unpatchify(patches_BNP: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """[B, C, H, W] from [B, N, C·P·P]: the inverse of `patchify` for a square image."""
    B, N, _ = patches_BNP.shape
    side = math.isqrt(N)
    assert side * side == N, N
    x = patches_BNP.reshape(B, side, side, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(B, channels, side * patch, side * patch)


def sincos_2d(side: int, dim: int) -> torch.Tensor:
    """[side², dim] fixed 2-D sin-cos positions (MAE's form): the first half of the channels
    encodes the row, the second half the column, each as [sin(p·ω_i), cos(p·ω_i)] with
    ω_i = 10000^(−i/(dim/4)), i < dim/4. `dim` must be a multiple of 4."""
    assert dim % 4 == 0, dim
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(side, dtype=torch.float64),
                                torch.arange(side, dtype=torch.float64), indexing="ij")

    def encode(pos):
        angle = pos.reshape(-1, 1) * omega
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([encode(rows), encode(cols)], dim=1).float()


class PatchEmbedding(MegatronModule):
    """uint8 or float images → [S, B, D] tokens (Megatron's sequence-first layout): pixels
    scaled to [−1, 1], patches projected by a linear (biased unless `bias=False`), the class
    token prepended, the positions added, then `pre_norm`'s LayerNorm (CLIP's `pre_layrnorm`).
    Replicated on every tensor-parallel rank (its parameters are small)."""

    def __init__(self, config, *, image_size: int, patch_size: int, channels: int = 3,
                 class_token: bool = True, position_embedding: str = "learned",
                 bias: bool = True, pre_norm: bool = False):
        super().__init__(config)
        D, side = config.hidden_size, image_size // patch_size
        self.patch_size, self.side = patch_size, side
        self.proj = torch.nn.Linear(channels * patch_size ** 2, D, bias=bias,
                                    dtype=config.params_dtype)
        self.pre_norm = None
        if pre_norm:
            self.pre_norm = LayerNorm(config, D, eps=config.layernorm_epsilon)
            # it runs before the sequence is split: every TP rank already gets the whole
            # gradient, so the sequence-parallel reduction over TP would count it TP times
            for p in self.pre_norm.parameters():
                p.sequence_parallel = False
        self.class_token = (torch.nn.Parameter(torch.zeros(1, D, dtype=config.params_dtype))
                            if class_token else None)
        S = side * side + int(class_token)
        if position_embedding == "learned":
            self.position_embeddings = torch.nn.Parameter(
                torch.zeros(S, D, dtype=config.params_dtype))
        else:   # fixed: a buffer, not saved (a function of the shape)
            pos_SD = sincos_2d(side, D)
            if class_token:   # the class token gets position zero's vector of all zeros
                pos_SD = torch.cat([torch.zeros(1, D), pos_SD])
            self.register_buffer("fixed_positions", pos_SD.to(config.params_dtype),
                                 persistent=False)
            self.position_embeddings = None

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.tokens(self.proj(patchify(self.scaled(images_BCHW), self.patch_size)))

    def scaled(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels → [−1, 1] in the projection's dtype (float input is taken as is)."""
        x = pixels.to(self.proj.weight.dtype)
        return x if pixels.is_floating_point() else x / 127.5 - 1.0

    def tokens(self, x_BND: torch.Tensor) -> torch.Tensor:
        """Projected patches [B, N, D] → [S, B, D]: class token, positions, pre-norm."""
        if self.class_token is not None:
            cls_B1D = self.class_token.expand(x_BND.shape[0], 1, -1)
            x_BND = torch.cat([cls_B1D, x_BND], dim=1)
        pos_SD = (self.position_embeddings if self.position_embeddings is not None
                  else self.fixed_positions)
        x_BSD = x_BND + pos_SD
        if self.pre_norm is not None:
            x_BSD = self.pre_norm(x_BSD)
        return x_BSD.transpose(0, 1).contiguous()


def timestep_sinusoid(t_B: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B, dim] sinusoidal features of (possibly fractional) timesteps, DiT's order:
    [cos(t·ω_i), sin(t·ω_i)] with ω_i = max_period^(−i/(dim/2)), i < dim/2. Computed in fp32."""
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t_B.device) / half)
    angle_BH = t_B.float()[:, None] * omega[None]
    return torch.cat([angle_BH.cos(), angle_BH.sin()], dim=-1)


class TimestepEmbedder(MegatronModule):
    """t → sinusoid (width `frequency_size`) → Linear → SiLU → Linear → [B, D] (DiT's
    TimestepEmbedder, Peebles & Xie 2023 §3.2)."""

    def __init__(self, config, frequency_size: int = 256):
        super().__init__(config)
        D, dtype = config.hidden_size, config.params_dtype
        self.frequency_size = frequency_size
        self.mlp_in = torch.nn.Linear(frequency_size, D, dtype=dtype)
        self.mlp_out = torch.nn.Linear(D, D, dtype=dtype)

    def forward(self, t_B: torch.Tensor) -> torch.Tensor:
        freq_BF = timestep_sinusoid(t_B, self.frequency_size).to(self.mlp_in.weight.dtype)
        return self.mlp_out(torch.nn.functional.silu(self.mlp_in(freq_BF)))


class ClassEmbedder(MegatronModule):
    """Class label → [B, D]: a table of `num_classes` + 1 rows, the last the null class that
    dropped labels (classifier-free guidance) and unconditional sampling use (DiT's
    LabelEmbedder; which labels drop is the caller's draw)."""

    def __init__(self, config, num_classes: int):
        super().__init__(config)
        self.null_class = num_classes
        self.embedding_table = torch.nn.Embedding(num_classes + 1, config.hidden_size,
                                                  dtype=config.params_dtype)

    def forward(self, labels_B: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels_B)
