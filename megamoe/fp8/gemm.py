"""FP8 GEMMs through `torch._scaled_mm`: `a [M, K] · b [N, K]ᵀ → fp32 [M, N]`.

Tensor and row scales are one `_scaled_mm` each. Blockwise (1×128 tiles against 128×128 blocks
or 1×128 tiles) is composed as DeepSeek-V3 promotes its accumulations: one rowwise `_scaled_mm`
per 128-wide K tile (each tile's scales are a row scale of that tile) summed in fp32. torch 2.13
rejects blockwise scale layouts on CPU, and this composition is exact FP8 arithmetic with fp32
accumulation. Legend as in megamoe.fp8.formats.
"""

from __future__ import annotations

import torch

from megamoe.fp8.formats import TILE, Quantised


def _mm(a8_MK, b8_NK, sa, sb) -> torch.Tensor:
    # CUDA's rowwise kernels write bf16 only; on CPU every layout accumulates into fp32
    out = torch.bfloat16 if a8_MK.is_cuda and sa.numel() > 1 else torch.float32
    y = torch._scaled_mm(a8_MK, b8_NK.t(), scale_a=sa, scale_b=sb, out_dtype=out)
    return y.float()


def _tile_scale(q: Quantised, k: int, rows: int) -> torch.Tensor:
    """Scale of K tile `k` for every row of `q` as a column [rows, 1]."""
    if q.kind == "tiles":
        return q.scale[:, k:k + 1].contiguous()
    assert q.kind == "blocks", q.kind
    return q.scale[:, k].repeat_interleave(TILE)[:rows].unsqueeze(1).contiguous()


def scaled_matmul(a: Quantised, b: Quantised) -> torch.Tensor:
    """fp32 `dequant(a) @ dequant(b)ᵀ` computed by FP8 kernels (accumulated in fp32)."""
    (M, K), (N, K2) = a.data.shape, b.data.shape
    assert K == K2, f"contraction sizes differ: {K} vs {K2}"
    if M == 0 or N == 0 or K == 0:
        return a.data.new_zeros((M, N), dtype=torch.float32)
    if a.kind == "tensor" and b.kind == "tensor":
        return _mm(a.data, b.data, a.scale.reshape(()), b.scale.reshape(()))
    if a.kind == "rows" and b.kind == "rows":
        return _mm(a.data, b.data, a.scale, b.scale.reshape(1, N))
    assert a.kind == "tiles" and b.kind in ("tiles", "blocks"), (a.kind, b.kind)
    y_MN = None
    for k in range(-(-K // TILE)):
        ks = slice(k * TILE, min(K, (k + 1) * TILE))
        part = _mm(a.data[:, ks].contiguous(), b.data[:, ks].contiguous(),
                   _tile_scale(a, k, M), _tile_scale(b, k, N).reshape(1, N))
        y_MN = part if y_MN is None else y_MN + part
    return y_MN


def emulated_matmul(a: Quantised, b: Quantised) -> torch.Tensor:
    """The reference the tests hold `scaled_matmul` to: dequantise, then an fp32 matmul."""
    return a.dequantise() @ b.dequantise().t()
