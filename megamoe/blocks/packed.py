"""Attention and positions for packed sequences (several samples per row, megamoe.data.pack):
each token attends causally within its own sample and never across samples, and its rotary
position restarts at 0 with every sample.

Attention: an explicit block-diagonal causal mask. Megatron-Core's local `DotProductAttention`
refuses `PackedSeqParams` ("use TEDotProductAttention"), but its torch softmax
(`FusedScaleMaskSoftmax.forward_torch_softmax`) applies any boolean `attention_mask` it is given
(True = masked, filled with −10000 before the softmax, which underflows to exactly 0 in fp32)
and builds its own causal mask only when it gets none, so the spec's `attn_mask_type: causal`
stays: a packed batch passes this mask, an unpacked one None. megamoe sets
`masked_softmax_fusion=False` everywhere, so the fused upper-triangular kernel, which would
ignore the mask, never runs. Cost: a [B, 1, S, S] mask and S² scores per row, as unpacked.

GPU integration point (not built): Transformer Engine's packed THD format (`PackedSeqParams`
with cu_seqlens, `TEDotProductAttention`, Megatron's thd RoPE) avoids the S² mask; megamoe has
no TE attention spec, so `data.packed_attention: thd` is refused (`check_packed_attention`)
with the probe's finding instead of running untested TE code.

Positions: Megatron's `RotaryEmbedding(seq_len)` returns the table for positions 0 … S−1,
shared by every row ([S, 1, 1, d]), and GPTModel computes it from the sequence length, never
from `position_ids`. `rotary_at_positions` gathers that table at each token's position id
([S, B, 1, d]); Megatron's unfused bshd RoPE (`apply_rope_fusion=False`) broadcasts it over
heads like its own M-RoPE tables.

Shapes: B rows, S positions, d rotary width.
"""

from __future__ import annotations

import importlib.util

import torch

from megamoe.config.errors import fail
from megamoe.config.schema import PACKED_ATTENTION


def block_causal_mask(segment_ids_BS: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, S, S], True = masked (Megatron's convention): query q may see key k iff
    k ≤ q and both belong to the same sample. Padding (−1) is one more segment, attending
    causally within itself, so no row of the softmax is empty."""
    S = segment_ids_BS.shape[1]
    same_BSS = segment_ids_BS[:, :, None] == segment_ids_BS[:, None, :]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=segment_ids_BS.device).tril()
    return ~(same_BSS & causal_SS)[:, None]


def rotary_at_positions(freqs_S11d: torch.Tensor, position_ids_BS: torch.Tensor) -> torch.Tensor:
    """[S, B, 1, d]: Megatron's rotary table for positions 0 … S−1 ([S, 1, 1, d]) read at each
    token's position id."""
    assert freqs_S11d.shape[1:3] == (1, 1), freqs_S11d.shape
    assert int(position_ids_BS.max()) < freqs_S11d.shape[0], "a position beyond the table"
    table_Sd = freqs_S11d[:, 0, 0]
    return table_Sd[position_ids_BS.transpose(0, 1).to(table_Sd.device)].unsqueeze(2)


def sample_numbers(segment_ids_BS: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(int64 [B, S]: each position's sample counted over the whole micro-batch in row-major
    order — row 0's samples, then row 1's — −1 on padding; the number of samples N). That
    order is the order of the batch's images and per-sample entries."""
    per_row_B = segment_ids_BS.max(dim=1).values + 1
    offsets_B = torch.cumsum(per_row_B, 0) - per_row_B
    numbers_BS = torch.where(segment_ids_BS >= 0, segment_ids_BS + offsets_B[:, None],
                             torch.full_like(segment_ids_BS, -1))
    return numbers_BS, int(per_row_B.sum())


def per_sample_sum(x_BS: torch.Tensor, numbers_BS: torch.Tensor, n: int) -> torch.Tensor:
    """[n]: the sum of `x` over each sample's positions (`sample_numbers`)."""
    valid_BS = numbers_BS >= 0
    out_N = torch.zeros(n, dtype=x_BS.dtype, device=x_BS.device)
    return out_N.index_add(0, numbers_BS[valid_BS].to(x_BS.device), x_BS[valid_BS])


def thd_attention_available() -> bool:
    """Capability probe for Transformer Engine's packed (THD) attention: CUDA and TE."""
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") \
        is not None


def check_packed_attention(kind: str) -> None:
    """`data.packed_attention`: 'mask' runs everywhere; 'thd' is the documented integration
    point only (module docstring): one error saying what the probe found."""
    assert kind in PACKED_ATTENTION, kind
    if kind == "thd":
        found = ("CUDA and Transformer Engine are present" if thd_attention_available() else
                 "it also needs CUDA and Transformer Engine, which this machine lacks")
        fail("data.packed_attention", f"'thd' (Transformer Engine's packed format) is not "
             f"built in megamoe, which has no TE attention spec ({found}); use 'mask' (an "
             f"explicit block-diagonal causal mask, any device)")
