"""The FP8 grouped linear: `y_TN = x_TK · w_ENKᵀ` for each expert's rows, with the forward,
input-gradient and weight-gradient GEMMs all in FP8 (megamoe.fp8.recipes names the operands).

Each expert's rows are quantised with that expert's scales (never shared across experts), then
multiplied by `megamoe.fp8.gemm.scaled_matmul` (one `torch._scaled_mm`, or one per 128-wide K
tile for blockwise). Master weights and the saved activations stay in their high precision; the
output has the input's dtype. An expert without rows computes nothing and gets a zero weight
gradient; rows whose upstream gradient is zero (padding) contribute exactly zero.

Under expert tensor parallelism a GEMM may contract a dimension this rank holds only a slice of
(`FP8Call.split`): the row-parallel fc2's forward (K = this rank's F slice) and the
column-parallel fc1's input gradient (N = this rank's slice of the output features). FP8
semantics are one process's: a row's scale is that of the whole row, so rowwise scales of both
operands of such a GEMM come from the row amaxes MAX-all-reduced over the expert-TP group
(`_whole_row_scales`), and each shard casts its slice exactly as one process casts that part of
the row; the partial products are then summed by the dispatcher's reduction as in fp32.
Blockwise tiles are local when the split slices are whole 128-wide tiles (the config requires
model.moe.ffn_hidden_size / expert-TP to be a multiple of 128); tensorwise and delayed scales
come from the per-expert amax, already all-reduced over the expert-TP group.

Legend: T rows (tokens routed to the local experts, grouped by expert), K input features,
N output features, E local experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megamoe.fp8.formats import TILE, Format, quantise, scale_from_amax
from megamoe.fp8.gemm import scaled_matmul
from megamoe.fp8.recipes import Recipe
from megamoe.fp8.state import G, W, X, FP8ScalingState


@dataclass
class FP8Call:
    """What one call needs besides tensors: the recipe, the state, which projection, and
    whether this pass records amaxes (not the no-grad first pass of activation recompute), and
    which dimension expert-TP splits: "k" (row-parallel: this rank holds a slice of the input
    features), "n" (column-parallel: a slice of the output features) or "" (none), over
    `split_group`."""
    recipe: Recipe
    state: FP8ScalingState
    proj: int
    record: bool = True
    split: str = ""
    split_group: object = None

    def splits(self, gemm: str) -> bool:
        """Whether `gemm`'s contraction is split over ranks (wgrad contracts tokens: never)."""
        split = {"fprop": "k", "dgrad": "n"}.get(gemm)
        return self.split_group is not None and self.split == split


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


def _whole_row_scales(a_MC: torch.Tensor, b_E_C: torch.Tensor, c_dim: int, fa: Format,
                      fb: Format, margin: int, group):
    """Row scales ([M, 1]; [E, R, 1]) of the GEMM operands `a_MC` and each expert's rows of `b`
    whose contraction C (`c_dim` of `b_E_C`) is split over `group`: from the amax of the whole
    row, the MAX over the group's slices (one all-reduce for both operands)."""
    amax_M = a_MC.detach().abs().amax(1).float()
    amax_ER = b_E_C.detach().abs().amax(c_dim).float()
    buf = torch.cat([amax_M, amax_ER.flatten()])
    dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group)
    M = amax_M.numel()
    return (scale_from_amax(buf[:M], fa, margin).unsqueeze(1),
            scale_from_amax(buf[M:], fb, margin).view(amax_ER.shape).unsqueeze(-1))


def _pick(kind: str, tensor_scale, row_scales=None, index=None):
    """The scale `quantise` is given: the expert's tensor scale, the whole rows' scales of a
    split contraction, or None (scales from the operand itself)."""
    if kind == "tensor":
        return tensor_scale
    return row_scales[index] if kind == "rows" and row_scales is not None else None


def _check_split_tiles(call: FP8Call, gemm: str, size: int) -> None:
    assert call.recipe.name != "blockwise" or not call.splits(gemm) or size % TILE == 0, \
        f"blockwise {gemm}: a split contraction of {size} is not whole 128-wide tiles"


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
        rx_T1 = rw_EN1 = None
        if call.splits("fprop") and ka == "rows":
            rx_T1, rw_EN1 = _whole_row_scales(x_TK, w_ENK, 2, r.fwd, r.fwd, r.margin,
                                              call.split_group)
        _check_split_tiles(call, "fprop", x_TK.shape[1])
        y_TN = x_TK.new_zeros((x_TK.shape[0], w_ENK.shape[1]), dtype=torch.float32)
        for e, rows in _segments(counts):
            if not counts[e]:
                continue
            xq = quantise(x_TK[rows], r.fwd, ka, scale=_pick(ka, sx_E[e], rx_T1, rows),
                          margin=r.margin, count=True)
            wq = quantise(w_ENK[e], r.fwd, kb, scale=_pick(kb, sw_E[e], rw_EN1, e),
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
        rg_T1 = rw_EK1 = None
        if call.splits("dgrad") and da == "rows":
            rg_T1, rw_EK1 = _whole_row_scales(g_TN, w_ENK, 1, r.grad, r.fwd, r.margin,
                                              call.split_group)
        _check_split_tiles(call, "dgrad", g_TN.shape[1])

        def q(t, fmt, kind, s):
            out = quantise(t, fmt, kind, scale=s, margin=r.margin, count=True)
            st.count(out.overflow, out.underflow)
            return out

        for e, rows in _segments(counts):
            if not counts[e]:
                continue
            g_tN = g_TN[rows]
            dx_TK[rows] = scaled_matmul(q(g_tN, r.grad, da, _pick(da, sg_E[e], rg_T1, rows)),
                                        q(w_ENK[e].t(), r.fwd, db, _pick(db, sw_E[e], rw_EK1, e)))
            dw_ENK[e] = scaled_matmul(q(g_tN.t(), r.grad, wa, _pick(wa, sg_E[e])),
                                      q(x_TK[rows].t(), r.fwd, wb, _pick(wb, sx_E[e])))
        return dx_TK.to(x_TK.dtype), dw_ENK.to(w_ENK.dtype), None, None


def fp8_grouped_linear(x_TK: torch.Tensor, w_ENK: torch.Tensor, counts: list[int],
                       call: FP8Call) -> torch.Tensor:
    """Rows `x_TK` grouped by expert (`counts[e]` rows for expert e) times each expert's
    `w_ENK[e]ᵀ`, in FP8 per `call.recipe`."""
    assert x_TK.dim() == 2 and w_ENK.dim() == 3 and len(counts) == w_ENK.shape[0]
    assert sum(counts) == x_TK.shape[0], (sum(counts), x_TK.shape)
    return _FP8GroupedLinear.apply(x_TK, w_ENK, [int(c) for c in counts], call)
