"""FP8 GEMMs are real FP8 arithmetic: per scale layout, `scaled_matmul` equals an explicit
quantise → dequantise → fp32-matmul emulation (megamoe.testing.fp8, written independently of
megamoe.fp8.formats) to accumulation tolerance, differs from the fp32 product by at least the
format's expected error, and stays within the error bound the format implies.

Error bound (stated once, used for every case): a value x in a group with scale s is stored as
q·s with |q·s − x| ≤ u·|x| + s·δ/2, u = 2^-(m+1) the unit roundoff of an m-bit mantissa and δ
the subnormal spacing (E4M3 2^-9, E5M2 2^-16). For a dot product of a and b this gives
|ŷ − y| ≤ Σ_k (e_a|b| + |a|e_b + e_a·e_b) with e = u|x| + s·δ/2 per operand, plus fp32
accumulation (K·2^-24·Σ|a||b|, negligible here). Lower bound on random normal inputs: the
rounding error of an operand has an RMS of about 0.4·u relative (spacing/√12), so the
relative Frobenius error of the product is at least u/8 (fp32 gets ~1e-7).
"""

import pytest
import torch

from megamoe.fp8 import E4M3, E5M2, emulated_matmul, quantise, scaled_matmul
from megamoe.testing.fp8 import SUBNORMAL_SPACING, fake_quant

ACCUM_RTOL = 1e-6

# (a kind, b kind) as the recipes use them: tensorwise/delayed, rowwise, blockwise fprop and
# dgrad, blockwise wgrad
LAYOUTS = [("tensor", "tensor"), ("rows", "rows"), ("tiles", "blocks"), ("tiles", "tiles")]


def _inputs(M, K, N, outliers: bool):
    g = torch.Generator().manual_seed(M * 7 + K + N)
    a, b = torch.randn(M, K, generator=g) * 3, torch.randn(N, K, generator=g)
    if outliers:   # a few huge activations (the LLM outlier features) and one large weight
        a[:, torch.randint(0, K, (3,), generator=g)] *= 500.0
        b[0, 0] = 80.0
    return a, b


def _bound(a, b, fa, fb, sa, sb):
    def err(x, fmt, s):
        return fmt.unit_roundoff * x.abs() + s * SUBNORMAL_SPACING[fmt.name] / 2
    ea, eb = err(a, fa, sa), err(b, fb, sb)
    bound = ea @ b.abs().t() + a.abs() @ eb.t() + ea @ eb.t()
    return bound + a.shape[1] * 2.0 ** -24 * (a.abs() @ b.abs().t())


@pytest.mark.parametrize("kinds", LAYOUTS, ids=lambda k: "x".join(k))
@pytest.mark.parametrize("fa", [E4M3, E5M2], ids=lambda f: f.name)
def test_scaled_matmul_is_fp8(kinds, fa):
    fb = E4M3
    for (M, K, N), outliers in [((37, 300, 130), False), ((64, 256, 200), True),
                                ((5, 129, 1), False)]:
        a, b = _inputs(M, K, N, outliers)
        qa, qb = quantise(a, fa, kinds[0]), quantise(b, fb, kinds[1])
        y = scaled_matmul(qa, qb)
        da, sa = fake_quant(a, fa, kinds[0])
        db, sb = fake_quant(b, fb, kinds[1])
        emu = da @ db.t()
        scale = emu.abs().max()
        assert (y - emu).abs().max() <= ACCUM_RTOL * scale, (kinds, M, K, N)
        # the package's own emulation (used by other tests) agrees with this one
        assert (emulated_matmul(qa, qb) - emu).abs().max() <= ACCUM_RTOL * scale
        ref = a @ b.t()
        assert ((y - ref).abs() <= _bound(a, b, fa, fb, sa, sb) * 1.0001 + 1e-6).all()
        if not outliers and M * N > 1:
            rel = ((y - ref).norm() / ref.norm()).item()
            assert rel >= fa.unit_roundoff / 8, (kinds, rel)


def test_negative_control_fp32_is_not_fp8():
    """The lower bound can fail: an fp32 product passes the emulation check for nothing."""
    a, b = _inputs(37, 300, 130, False)
    ref = a @ b.t()
    assert ((ref - a @ b.t()).norm() / ref.norm()).item() < E4M3.unit_roundoff / 8
    da, _ = fake_quant(a, E4M3, "tensor")
    db, _ = fake_quant(b, E4M3, "tensor")
    assert (ref - da @ db.t()).abs().max() > ACCUM_RTOL * ref.abs().max()


def _partner(kind):
    """A scale layout that `scaled_matmul` pairs with `kind` (blocks are only ever b)."""
    return {"tiles": "blocks", "blocks": "blocks"}.get(kind, kind)


@pytest.mark.parametrize("kind", ["tensor", "rows", "tiles"])
def test_empty_and_zero_operands(kind):
    """Empty groups and all-zero tensors (scale 1, no division by zero): no NaN/Inf."""
    for M, K, N in [(0, 64, 16), (8, 0, 16), (8, 64, 0)]:
        qa = quantise(torch.randn(M, K), E4M3, kind)
        qb = quantise(torch.randn(N, K), E4M3, _partner(kind))
        y = scaled_matmul(qa, qb)
        assert y.shape == (M, N) and (y == 0).all()
    qz = quantise(torch.zeros(8, 64), E5M2, kind)
    assert torch.isfinite(qz.scale).all() and (qz.data.float() == 0).all()
    y = scaled_matmul(qz, quantise(torch.randn(4, 64), E4M3,
                                   _partner(kind)))
    assert (y == 0).all()


def test_overflow_and_underflow_counted():
    """A stale (delayed) scale saturates values beyond fmax; tiny values flush to zero."""
    x = torch.tensor([[1.0, 2.0, 1000.0, 1e-9]])
    q = quantise(x, E4M3, "tensor", scale=torch.tensor(2.0 / E4M3.max), count=True)
    assert q.overflow == 1 and q.underflow == 1
    assert q.dequantise()[0, 2].item() == pytest.approx(2.0)   # saturated at fmax·s
