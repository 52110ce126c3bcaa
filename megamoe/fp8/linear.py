"""The FP8 grouped linear: `y_TN = x_TK · w_ENKᵀ` for each expert's rows, with the forward,
input-gradient and weight-gradient GEMMs all in FP8 (megamoe.fp8.recipes names the operands).

Each expert's rows are quantised with that expert's scales (never shared across experts), then
multiplied by `megamoe.fp8.gemm.scaled_matmul` (one `torch._scaled_mm`, or one per 128-wide K
tile for blockwise). Master weights and the saved activations stay in their high precision; the
output has the input's dtype. An expert without rows computes nothing and gets a zero weight
gradient; rows whose upstream gradient is zero (padding) contribute exactly zero.

Legend: T rows (tokens routed to the local experts, grouped by expert), K input features,
N output features, E local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megamoe.fp8.formats import quantise
from megamoe.fp8.gemm import scaled_matmul
from megamoe.fp8.recipes import Recipe
from megamoe.fp8.state import G, W, X, FP8ScalingState


@dataclass
class FP8Call:
    """What one call needs besides tensors: the recipe, the state, which projection, and
    whether this pass records amaxes (not the no-grad first pass of activation recompute)."""
    recipe: Recipe
    state: FP8ScalingState
    proj: int
    record: bool = True


def _segments(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        yield e, slice(start, start + n)
        start += n


def _amax_per_expert(t_TK: torch.Tensor, counts: list[int]) -> torch.Tensor:
    out = torch.zeros(len(counts), dtype=torch.float32, device=t_TK.device)
    for e, rows in _segments(counts):
        if counts[e]:
            out[e] = t_TK[rows].detach().abs().amax().float()
    return out


class _FP8GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TK, w_ENK, counts, call: FP8Call):
        r, st = call.recipe, call.state
        amax_E2 = torch.stack([_amax_per_expert(x_TK, counts),
                               w_ENK.detach().abs().amax(dim=(1, 2)).float()], dim=1)
        st.sync_amax(amax_E2)
        sx_E = st.scales(call.proj, X, amax_E2[:, 0], r.fwd, r.margin, r.delayed)
        sw_E = st.scales(call.proj, W, amax_E2[:, 1], r.fwd, r.margin, r.delayed)
        if call.record:
            st.record(call.proj, X, amax_E2[:, 0])
            st.record(call.proj, W, amax_E2[:, 1])
        ka, kb = r.kinds("fprop")
        y_TN = x_TK.new_zeros((x_TK.shape[0], w_ENK.shape[1]), dtype=torch.float32)
        for e, rows in _segments(counts):
            if not counts[e]:
                continue
            xq = quantise(x_TK[rows], r.fwd, ka, scale=sx_E[e] if ka == "tensor" else None,
                          margin=r.margin, count=True)
            wq = quantise(w_ENK[e], r.fwd, kb, scale=sw_E[e] if kb == "tensor" else None,
                          margin=r.margin, count=True)
            st.count(xq.overflow + wq.overflow, xq.underflow + wq.underflow)
            y_TN[rows] = scaled_matmul(xq, wq)
        ctx.save_for_backward(x_TK, w_ENK, sx_E, sw_E)
        ctx.counts, ctx.call = counts, call
        return y_TN.to(x_TK.dtype)

    @staticmethod
    def backward(ctx, g_TN):
        x_TK, w_ENK, sx_E, sw_E = ctx.saved_tensors
        counts, call = ctx.counts, ctx.call
        r, st = call.recipe, call.state
        amax_E = st.sync_amax(_amax_per_expert(g_TN, counts))
        sg_E = st.scales(call.proj, G, amax_E, r.grad, r.margin, r.delayed)
        if call.record:
            st.record(call.proj, G, amax_E)
        dx_TK = torch.zeros(x_TK.shape, dtype=torch.float32, device=x_TK.device)
        dw_ENK = torch.zeros(w_ENK.shape, dtype=torch.float32, device=w_ENK.device)
        (da, db), (wa, wb) = r.kinds("dgrad"), r.kinds("wgrad")

        def q(t, fmt, kind, s):
            out = quantise(t, fmt, kind, scale=s if kind == "tensor" else None, margin=r.margin,
                           count=True)
            st.count(out.overflow, out.underflow)
            return out

        for e, rows in _segments(counts):
            if not counts[e]:
                continue
            g_tN = g_TN[rows]
            dx_TK[rows] = scaled_matmul(q(g_tN, r.grad, da, sg_E[e]),
                                        q(w_ENK[e].t(), r.fwd, db, sw_E[e]))
            dw_ENK[e] = scaled_matmul(q(g_tN.t(), r.grad, wa, sg_E[e]),
                                      q(x_TK[rows].t(), r.fwd, wb, sx_E[e]))
        return dx_TK.to(x_TK.dtype), dw_ENK.to(w_ENK.dtype), None, None


def fp8_grouped_linear(x_TK: torch.Tensor, w_ENK: torch.Tensor, counts: list[int],
                       call: FP8Call) -> torch.Tensor:
    """Rows `x_TK` grouped by expert (`counts[e]` rows for expert e) times each expert's
    `w_ENK[e]ᵀ`, in FP8 per `call.recipe`."""
    assert x_TK.dim() == 2 and w_ENK.dim() == 3 and len(counts) == w_ENK.shape[0]
    assert sum(counts) == x_TK.shape[0], (sum(counts), x_TK.shape)
    return _FP8GroupedLinear.apply(x_TK, w_ENK, [int(c) for c in counts], call)
