"""Video tubelet embeddings: a clip of T frames cut into non-overlapping t × P × P tubelets
(t frames of a P × P patch), each linearly embedded into one token — ViViT's "tubelet
embedding" (Arnab et al. 2021, §3.2), the same map as a Conv3d with stride = kernel = (t, P, P)
— with 3-D absolute positions: learned (one vector per token), or fixed sin-cos with the
channels split in three, a third each encoding the time slice, the row and the column (MAE's
2-D form, megamoe.blocks.embeddings.sincos_2d, extended by one axis). No family knowledge: the
vit family's vision tower uses it for video (megamoe.models.vit.model).

Token order: time slice by time slice, each row-major (row by row, left to right); a tubelet is
flattened channel-major (c, dt, dy, dx), so `proj.weight.reshape(D, C, t, P, P)` is the
equivalent Conv3d's kernel.

Shapes: B clips, T frames, C channels, H, W frame sides, t tubelet length, P patch side,
N = (T/t)·(H/P)·(W/P) tubelets, S tokens (N, + 1 with the class token), D model width.
"""

from __future__ import annotations

import torch

from megamoe.blocks.embeddings import PatchEmbedding


def tubeletify(clips_BTCHW: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """[B, N, C·t·P·P]: the clip's tubelets in token order, each flattened (c, dt, dy, dx)."""
    B, T, C, H, W = clips_BTCHW.shape
    x = clips_BTCHW.reshape(B, T // tubelet, tubelet, C, H // patch, patch, W // patch, patch)
    # (B, τ, dt, C, row, dy, col, dx) → (B, τ, row, col, C, dt, dy, dx)
    x = x.permute(0, 1, 4, 6, 3, 2, 5, 7)
    return x.reshape(B, (T // tubelet) * (H // patch) * (W // patch), C * tubelet * patch * patch)


def _sincos(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """[len(pos), dim]: [sin(p·ω_i), cos(p·ω_i)], ω_i = 10000^(−i/(dim/2)), i < dim/2."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angle = pos.reshape(-1, 1).double() * omega
    return torch.cat([angle.sin(), angle.cos()], dim=1)


def sincos_3d(slices: int, side: int, dim: int) -> torch.Tensor:
    """[slices·side², dim] fixed 3-D sin-cos positions in token order: channels [0, dim/3)
    encode the time slice, [dim/3, 2·dim/3) the row, [2·dim/3, dim) the column. `dim` must be
    a multiple of 6 (each third an even number of channels)."""
    assert dim % 6 == 0, dim
    t, r, c = torch.meshgrid(torch.arange(slices), torch.arange(side), torch.arange(side),
                             indexing="ij")
    third = dim // 3
    return torch.cat([_sincos(t, third), _sincos(r, third), _sincos(c, third)], dim=1).float()


class TubeletEmbedding(PatchEmbedding):
    """uint8 or float clips [B, T, C, H, W] → [S, B, D] (Megatron's sequence-first layout):
    pixels scaled to [−1, 1], tubelets projected by a linear (biased unless `bias=False`), then
    the image embedding's class token, 3-D positions (learned or `sincos`) and pre-norm."""

    def __init__(self, config, *, image_size: int, patch_size: int, frames: int,
                 tubelet_size: int, channels: int = 3, class_token: bool = True,
                 position_embedding: str = "learned", bias: bool = True,
                 pre_norm: bool = False):
        assert frames % tubelet_size == 0, (frames, tubelet_size)
        # the image embedding with a t-times wider patch; its positions are replaced below
        super().__init__(config, image_size=image_size, patch_size=patch_size,
                         channels=channels * tubelet_size, class_token=class_token,
                         position_embedding="learned", bias=bias, pre_norm=pre_norm)
        D = config.hidden_size
        self.tubelet_size, self.slices = tubelet_size, frames // tubelet_size
        S = self.slices * self.side ** 2 + int(class_token)
        if position_embedding == "learned":
            self.position_embeddings = torch.nn.Parameter(
                torch.zeros(S, D, dtype=config.params_dtype))
        else:   # fixed: a buffer, not saved (a function of the shape)
            pos_SD = sincos_3d(self.slices, self.side, D)
            if class_token:   # the class token gets a vector of zeros, as in 2-D
                pos_SD = torch.cat([torch.zeros(1, D), pos_SD])
            self.position_embeddings = None
            self.register_buffer("fixed_positions", pos_SD.to(config.params_dtype),
                                 persistent=False)

    def forward(self, clips_BTCHW: torch.Tensor) -> torch.Tensor:
        assert clips_BTCHW.dim() == 5 and clips_BTCHW.shape[1] == self.slices * \
            self.tubelet_size, (tuple(clips_BTCHW.shape), self.slices, self.tubelet_size)
        x_BNP = tubeletify(self.scaled(clips_BTCHW), self.tubelet_size, self.patch_size)
        return self.tokens(self.proj(x_BNP))
