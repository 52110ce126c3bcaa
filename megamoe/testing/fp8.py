"""An FP8 emulation for tests, written independently of megamoe.fp8.formats: per-element scales
from plain loops over the scale groups, then quantise → dequantise. The FP8 tests hold the real
FP8 GEMMs to `fake_quant(a) @ fake_quant(b)ᵀ` in fp32."""

from __future__ import annotations

import torch

TILE = 128
SUBNORMAL_SPACING = {"e4m3": 2.0 ** -9, "e5m2": 2.0 ** -16}


def group_scales(x, fmt, kind):
    """Per-element dequantisation scale, computed with plain loops over the groups."""
    M, K = x.shape
    s = torch.empty(M, K)
    a = x.abs()

    def put(rows, cols):
        amax = a[rows, cols].max() if a[rows, cols].numel() else torch.tensor(0.0)
        s[rows, cols] = amax / fmt.max if amax > 0 else 1.0

    if kind == "tensor":
        put(slice(None), slice(None))
    elif kind == "rows":
        for i in range(M):
            put(slice(i, i + 1), slice(None))
    elif kind == "tiles":
        for i in range(M):
            for k in range(0, K, TILE):
                put(slice(i, i + 1), slice(k, k + TILE))
    else:
        for i in range(0, M, TILE):
            for k in range(0, K, TILE):
                put(slice(i, i + TILE), slice(k, k + TILE))
    return s


def fake_quant(x, fmt, kind):
    """(dequantised x, per-element scale): the emulation's operand."""
    s = group_scales(x, fmt, kind)
    return (x / s).clamp(-fmt.max, fmt.max).to(fmt.dtype).float() * s, s
