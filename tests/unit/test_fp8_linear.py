"""The FP8 grouped linear runs its forward, input-gradient and weight-gradient GEMMs in FP8 with
per-expert scales: per recipe each equals the explicit emulation (megamoe.testing.fp8) to
accumulation tolerance and differs from fp32 by at least the format's expected error (u/8, see
test_fp8_gemm); delayed scaling casts with the history's amax; empty experts and padded rows
(zero upstream gradient) give no NaN/Inf and no gradient."""

import pytest
import torch

from megamoe.fp8 import RECIPES, FP8Call, FP8ScalingState, fp8_grouped_linear, make_recipe
from megamoe.testing.fp8 import fake_quant

ACCUM_RTOL = 1e-6
COUNTS = [50, 0, 200, 7]      # expert 1 gets no rows


def _data(seed=0, K=96, N=160):
    g = torch.Generator().manual_seed(seed)
    T = sum(COUNTS)
    x = (torch.randn(T, K, generator=g) * 2).requires_grad_()
    w = (torch.randn(len(COUNTS), N, K, generator=g) * 0.1).requires_grad_()
    return x, w, torch.randn(T, N, generator=g)


def _segments():
    start = 0
    for e, n in enumerate(COUNTS):
        yield e, slice(start, start + n)
        start += n


def _emulate(recipe, x, w, g):
    """(y, dx, dw) from dequantised operands and fp32 matmuls, expert by expert."""
    fk, bk, wk = recipe.kinds("fprop"), recipe.kinds("dgrad"), recipe.kinds("wgrad")
    y = torch.zeros(x.shape[0], w.shape[1])
    dx, dw = torch.zeros_like(x), torch.zeros_like(w)
    for e, rows in _segments():
        if not COUNTS[e]:
            continue
        xe, we, ge = x[rows].detach(), w[e].detach(), g[rows]
        fq = lambda t, fmt, kind: fake_quant(t, fmt, kind)[0]   # noqa: E731
        y[rows] = fq(xe, recipe.fwd, fk[0]) @ fq(we, recipe.fwd, fk[1]).t()
        dx[rows] = fq(ge, recipe.grad, bk[0]) @ fq(we.t(), recipe.fwd, bk[1]).t()
        dw[e] = fq(ge.t(), recipe.grad, wk[0]) @ fq(xe.t(), recipe.fwd, wk[1]).t()
    return y, dx, dw


def _run(recipe, x, w, g, state=None):
    state = state or FP8ScalingState(len(COUNTS), 1, recipe.history_len)
    x.grad = w.grad = None
    y = fp8_grouped_linear(x, w, COUNTS, FP8Call(recipe, state, 0))
    y.backward(g)
    return y.detach(), x.grad, w.grad, state


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("name", RECIPES)
def test_fprop_dgrad_wgrad_are_fp8(name):
    recipe = make_recipe(name)
    x, w, g = _data()
    got = _run(recipe, x, w, g)[:3]
    emu = _emulate(recipe, x, w, g)
    ref = torch.autograd.grad(torch.cat([x[r] @ w[e].t() for e, r in _segments()]), (x, w), g)
    ref = ((torch.cat([x[r] @ w[e].t() for e, r in _segments()])).detach(), *ref)
    for what, a, b, r, fmt in zip(("y", "dx", "dw"), got, emu, ref,
                                  (recipe.fwd, recipe.grad, recipe.grad)):
        assert (a - b).abs().max() <= ACCUM_RTOL * b.abs().max(), (name, what)
        assert _rel(a, r) >= fmt.unit_roundoff / 8, (name, what, _rel(a, r))
        assert _rel(a, r) <= 2 * fmt.unit_roundoff, (name, what, _rel(a, r))
    assert (got[2][1] == 0).all()                      # the empty expert: no gradient


def test_negative_control_wrong_format_fails():
    """The emulation check can fail: E4M3 gradients against an E5M2 emulation differ."""
    x, w, g = _data()
    got = _run(make_recipe("tensorwise", grad_format="e4m3"), x, w, g)
    emu = _emulate(make_recipe("tensorwise", grad_format="e5m2"), x, w, g)
    assert (got[0] - emu[0]).abs().max() <= ACCUM_RTOL * emu[0].abs().max()   # fprop: same
    assert (got[1] - emu[1]).abs().max() > ACCUM_RTOL * emu[1].abs().max()


def test_delayed_scaling_uses_the_history():
    """Step 1 (empty history) scales by the current amax; step 2 by the max of the history, so
    a smaller input is cast with the first step's larger scale, and a larger one saturates."""
    recipe = make_recipe("delayed", history_len=4)
    x, w, g = _data()
    _, _, _, state = _run(recipe, x, w, g)
    assert state.amax_history[2, 0, 0, 0] == x[50:250].detach().abs().max()
    y_small = _run(recipe, (x.detach() * 0.25).requires_grad_(), w, g, state)[0]
    ys, amax_prev = [], x.detach().abs()
    for e, rows in _segments():           # the emulation with the previous step's scale
        if COUNTS[e]:
            s = amax_prev[rows].max() / recipe.fwd.max
            xq = (x.detach()[rows] * 0.25 / s).to(recipe.fwd.dtype).float() * s
            ys.append(xq @ fake_quant(w[e].detach(), recipe.fwd, "tensor")[0].t())
    emu = torch.cat(ys)
    assert (y_small - emu).abs().max() <= ACCUM_RTOL * emu.abs().max()
    assert state.amax_history[2, 0, 0, 1] == x[50:250].detach().abs().max()   # rolled
    state.read_counters()
    _run(recipe, (x.detach() * 4).requires_grad_(), w, g, state)
    assert state.read_counters()["fp8_overflow"] > 0


@pytest.mark.parametrize("name", RECIPES)
def test_padded_rows_and_zero_experts_are_safe(name):
    """Rows routed for alignment carry a zero upstream gradient (probability 0); an expert may
    see only zeros (amax 0): outputs and gradients stay finite, padded rows get none."""
    recipe = make_recipe(name)
    x, w, g = _data(seed=1)
    with torch.no_grad():
        x[250:] = 0.0                   # expert 3: all-zero inputs
        w[0].mul_(1e-30)                # expert 0: weights that underflow
    g[40:50] = 0.0                      # expert 0's last 10 rows: padding
    y, dx, dw, _ = _run(recipe, x, w, g)
    for t in (y, dx, dw):
        assert torch.isfinite(t).all()
    assert (dx[40:50] == 0).all() and (dw[1] == 0).all() and (dw[3] == 0).all()
    assert (y[250:] == 0).all()
