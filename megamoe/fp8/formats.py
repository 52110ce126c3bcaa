"""FP8 formats and quantisation with per-tensor, per-row, 1×128-tile and 128×128-block scales.

A quantised tensor is `q * s`: `q` in an FP8 dtype, `s` the fp32 dequantisation scale that
`torch._scaled_mm` takes as `scale_a`/`scale_b`. `s = amax / fmax · 2^margin`: the largest
magnitude lands on the format's largest finite value (less a margin of headroom); an all-zero
group gets `s = 1` so nothing divides by zero. Values beyond `fmax · s` (possible only when the
scale comes from an older amax: delayed scaling) saturate and count as overflows; nonzero values
that round to zero count as underflows.

Legend: M rows, K the contraction (last) dimension, N rows of the other GEMM operand,
nK = ceil(K / 128) tiles, nM = ceil(M / 128) row blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TILE = 128          # DeepSeek-V3: 1×128 activation tiles, 128×128 weight blocks


@dataclass(frozen=True)
class Format:
    name: str
    dtype: torch.dtype
    max: float               # largest finite value
    mantissa_bits: int

    @property
    def unit_roundoff(self) -> float:
        """Relative rounding error bound of a normal number: 2^-(m+1)."""
        return 2.0 ** -(self.mantissa_bits + 1)


E4M3 = Format("e4m3", torch.float8_e4m3fn, 448.0, 3)
E5M2 = Format("e5m2", torch.float8_e5m2, 57344.0, 2)
FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


@dataclass
class Quantised:
    """`data` [M, K] in FP8 and its scales: [] (tensor), [M, 1] (rows), [M, nK] (tiles) or
    [nM, nK] (blocks); `kind` names which."""
    data: torch.Tensor
    scale: torch.Tensor
    kind: str
    overflow: int = 0
    underflow: int = 0

    def dequantise(self) -> torch.Tensor:
        """fp32 `q * s` with each scale broadcast over its group: the emulation's operand."""
        M, K = self.data.shape
        s = self.scale
        if self.kind == "tiles":
            s = s.repeat_interleave(TILE, dim=1)[:, :K]
        elif self.kind == "blocks":
            s = s.repeat_interleave(TILE, dim=0)[:M].repeat_interleave(TILE, dim=1)[:, :K]
        return self.data.float() * s


def scale_from_amax(amax: torch.Tensor, fmt: Format, margin: int = 0) -> torch.Tensor:
    """Dequantisation scale(s) for the given amax(es); 1 where amax is 0 (or not finite)."""
    amax = amax.float()
    ok = torch.isfinite(amax) & (amax > 0)
    return torch.where(ok, amax / fmt.max * 2.0 ** margin, torch.ones_like(amax))


def _cast(x: torch.Tensor, s_full: torch.Tensor, fmt: Format, count: bool):
    """(fp8 x / s saturated, overflows, underflows); `s_full` broadcasts against `x`."""
    y = x.float() / s_full
    over = under = 0
    if count:
        # beyond the rounding range of fmax (float error on an exact amax scale is not one)
        over = int((y.abs() > fmt.max * (1 + fmt.unit_roundoff)).sum())
    q = y.clamp(-fmt.max, fmt.max).to(fmt.dtype).contiguous()
    if count:
        under = int(((q.float() == 0) & (x != 0)).sum())
    return q, over, under


def quantise(x_MK: torch.Tensor, fmt: Format, kind: str, *, scale: torch.Tensor | None = None,
             margin: int = 0, count: bool = False) -> Quantised:
    """Quantise `x_MK` along K with scales of `kind`: tensor | rows | tiles | blocks. `scale`
    (tensor: [], rows: [M, 1]) overrides the scale of the local amax: delayed scaling, and rows
    whose K is split over expert-TP ranks (the scale of the whole row's amax)."""
    assert x_MK.dim() == 2, f"quantise expects [M, K], got {tuple(x_MK.shape)}"
    M, K = x_MK.shape
    a = x_MK.detach().float().abs()
    if kind == "tensor":
        s = scale if scale is not None else scale_from_amax(
            a.amax() if a.numel() else a.new_zeros(()), fmt, margin)
        s_full = s
    elif kind == "rows":
        s = scale if scale is not None else scale_from_amax(
            a.amax(1, keepdim=True) if K else a.new_zeros(M, 1), fmt, margin)
        assert s.shape == (M, 1), f"row scales {tuple(s.shape)} for {M} rows"
        s_full = s
    elif kind == "tiles":
        nK = -(-K // TILE)
        pad = nK * TILE - K
        a_t = torch.nn.functional.pad(a, (0, pad)).view(M, nK, TILE)
        s = scale_from_amax(a_t.amax(2) if M else a.new_zeros(0, nK), fmt, margin)
        s_full = s.repeat_interleave(TILE, dim=1)[:, :K]
    elif kind == "blocks":
        nM, nK = -(-M // TILE), -(-K // TILE)
        a_b = torch.nn.functional.pad(a, (0, nK * TILE - K, 0, nM * TILE - M))
        a_b = a_b.view(nM, TILE, nK, TILE).amax(dim=(1, 3))
        s = scale_from_amax(a_b, fmt, margin)
        s_full = s.repeat_interleave(TILE, dim=0)[:M].repeat_interleave(TILE, dim=1)[:, :K]
    else:
        raise AssertionError(f"unknown scale kind {kind!r}")
    q, over, under = _cast(x_MK, s_full, fmt, count)
    return Quantised(q, s.float().contiguous(), kind, over, under)
