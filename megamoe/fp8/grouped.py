"""The rowwise FP8 grouped linear on CUDA: forward and input gradient as one
`torch._scaled_grouped_mm` each over all local experts (per-token and per-channel scales, E4M3
operands, bf16 output); the weight gradient, which contracts each expert's own tokens, as one
rowwise `torch._scaled_mm` per expert. Each expert's rows must be a multiple of 16 (the routing
map is padded: megamoe.fp8.backends.row_multiple).

Written against torch 2.13's documented layout rules (row-major a, column-major b, scales
[T] and [E, N]); no GPU was available when it was written, so tests/gpu/test_fp8_gpu.py, which
compares it with the per-expert back end, is its only check. Legend as in megamoe.fp8.linear.
"""

from __future__ import annotations

import torch

from megamoe.fp8.formats import E4M3, quantise
from megamoe.fp8.gemm import scaled_matmul
from megamoe.fp8.linear import FP8Call, _amax_per_expert, _segments
from megamoe.fp8.state import G, W, X


def _rows_q(t_MK: torch.Tensor):
    q = quantise(t_MK, E4M3, "rows")
    return q.data, q.scale.reshape(-1)


def _experts_rows_q(w_ENK: torch.Tensor):
    """Each expert's [N, K] quantised per row: data [E, N, K], scales [E, N]."""
    E, N, K = w_ENK.shape
    q = quantise(w_ENK.reshape(E * N, K), E4M3, "rows")
    return q.data.view(E, N, K), q.scale.view(E, N)


def _grouped(a8_TK, sa_T, b8_ENK, sb_EN, offs_E):
    return torch._scaled_grouped_mm(a8_TK, b8_ENK.transpose(1, 2), sa_T, sb_EN, offs=offs_E,
                                    out_dtype=torch.bfloat16)


class _FP8ScaledGroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TK, w_ENK, counts, call: FP8Call):
        st = call.state
        if call.record:   # amax history for the logs and replicas (the scales are per row)
            amax_E2 = torch.stack([_amax_per_expert(x_TK, counts),
                                   w_ENK.detach().abs().amax(dim=(1, 2)).float()], dim=1)
            st.sync_amax(amax_E2)
            st.record(call.proj, X, amax_E2[:, 0])
            st.record(call.proj, W, amax_E2[:, 1])
        offs_E = torch.tensor(counts, device=x_TK.device).cumsum(0).to(torch.int32)
        x8, sx = _rows_q(x_TK)
        w8, sw = _experts_rows_q(w_ENK)
        y_TN = _grouped(x8, sx, w8, sw, offs_E)
        ctx.save_for_backward(x_TK, w_ENK, offs_E)
        ctx.counts, ctx.call = counts, call
        return y_TN.to(x_TK.dtype)

    @staticmethod
    def backward(ctx, g_TN):
        x_TK, w_ENK, offs_E = ctx.saved_tensors
        counts, call = ctx.counts, ctx.call
        if call.record:
            amax_E = call.state.sync_amax(_amax_per_expert(g_TN, counts))
            call.state.record(call.proj, G, amax_E)
        g8, sg = _rows_q(g_TN.contiguous())
        wT8, swT = _experts_rows_q(w_ENK.transpose(1, 2))
        dx_TK = _grouped(g8, sg, wT8, swT, offs_E)
        dw_ENK = torch.zeros(w_ENK.shape, dtype=torch.float32, device=w_ENK.device)
        for e, rows in _segments(counts):
            if counts[e]:
                dw_ENK[e] = scaled_matmul(quantise(g_TN[rows].t(), E4M3, "rows"),
                                          quantise(x_TK[rows].t(), E4M3, "rows"))
        return dx_TK.to(x_TK.dtype), dw_ENK.to(w_ENK.dtype), None, None


def fp8_scaled_grouped_linear(x_TK, w_ENK, counts: list[int], call: FP8Call) -> torch.Tensor:
    """`fp8_grouped_linear` for the rowwise recipe on CUDA with E4M3 gradients."""
    assert x_TK.is_cuda and call.recipe.name == "rowwise" and call.recipe.grad is E4M3, \
        "scaled_grouped_mm: CUDA, rowwise recipe, E4M3 gradients"
    assert all(c % 16 == 0 for c in counts), f"expert rows not aligned to 16: {counts}"
    return _FP8ScaledGroupedLinear.apply(x_TK, w_ENK, [int(c) for c in counts], call)
