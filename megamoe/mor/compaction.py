"""Compacted batches of the tokens active at a recursion step (Mixture-of-Recursions, Bae et al.,
arXiv 2507.10524, §2.2.1 and App. A; papers.md §1.4.5).

Compute is really skipped: each sequence's active tokens are gathered (ascending positions) into a
batch of length K = the largest count, padded where sequences keep fewer tokens (token-choice, or
expert-choice under the σ > 0.5 inference rule). The shared layers then see
- a causal mask among the gathered tokens (key j visible to query i iff pos_j ≤ pos_i), pads
  hidden as keys (recursion-wise KV caching: step r attends to the tokens active at step r);
- RoPE at the tokens' *original* positions (Megatron's `rotary_pos_emb` per position, [K, B, 1, d]);
- for recursive KV sharing, a [K, S] mask: queries of the gathered tokens against the full
  sequence's first-recursion K/V, causal in original positions.

Megatron layout: hidden states are [S, B, D]; masks are bool [B, 1, Q, Kv] with True = hidden.
Shapes: B batch, S sequence, N candidates, K gathered (with pads), D hidden, d rotary dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def compact_rows(keep_BN: torch.Tensor, cand_BN: torch.Tensor, *values_BN: torch.Tensor):
    """The kept candidates of every row in their (ascending) order, padded to the longest row:
    (index_BK, valid_BK, *values_BK); pads hold index 0 and value 0. K ≥ 1 even when nothing
    is kept: a step then runs one pad per sequence, so that every rank runs every recursion
    step and the collectives inside shared layers (expert-parallel MoE) stay matched."""
    counts_B = keep_BN.sum(1)
    K = max(1, int(counts_B.max().item()) if keep_BN.numel() else 0)
    # a stable sort moves kept entries first and keeps their order
    order_BK = torch.sort((~keep_BN).to(torch.int8), dim=1, stable=True).indices[:, :K]
    valid_BK = torch.arange(K, device=keep_BN.device)[None, :] < counts_B[:, None]
    index_BK = torch.gather(cand_BN, 1, order_BK) * valid_BK
    values = [torch.gather(v, 1, order_BK) * valid_BK for v in values_BN]
    return (index_BK, valid_BK, *values)


@dataclass
class Compaction:
    """Positions (in the full sequence) of the gathered tokens of every sequence."""
    index_BK: torch.Tensor      # long, ascending over the valid entries
    valid_BK: torch.Tensor      # bool, False on pads

    @classmethod
    def from_mask(cls, active_BS: torch.Tensor) -> "Compaction":
        B, S = active_BS.shape
        pos_BS = torch.arange(S, device=active_BS.device).expand(B, S)
        index_BK, valid_BK = compact_rows(active_BS, pos_BS)
        return cls(index_BK, valid_BK)

    @property
    def size(self) -> int:
        return self.index_BK.shape[1]

    def padded(self, multiple: int) -> "Compaction":
        """K rounded up to a multiple of `multiple` with extra pads (index 0, invalid): the
        compact batch of a step must split into equal sequence-parallel shards."""
        extra = -self.size % multiple
        if not extra:
            return self
        B = self.index_BK.shape[0]
        return Compaction(torch.cat([self.index_BK, self.index_BK.new_zeros(B, extra)], 1),
                          torch.cat([self.valid_BK, self.valid_BK.new_zeros(B, extra)], 1))

    def active_mask(self, S: int) -> torch.Tensor:
        """bool [B, S]: the tokens this compaction holds."""
        counts_BS = torch.zeros(self.index_BK.shape[0], S, dtype=torch.int32,
                                device=self.index_BK.device)
        return counts_BS.scatter_add_(1, self.index_BK, self.valid_BK.to(torch.int32)) > 0

    def gather(self, x_SBD: torch.Tensor) -> torch.Tensor:
        """[S, B, D] → [K, B, D] (pads copy position 0; they are masked and discarded)."""
        idx_KBD = self.index_BK.T[..., None].expand(-1, -1, x_SBD.shape[-1])
        return torch.gather(x_SBD, 0, idx_KBD)

    def expand(self, y_KBD: torch.Tensor, S: int) -> torch.Tensor:
        """[K, B, D] → [S, B, D]: each gathered token's row at its position, 0 elsewhere
        (pads contribute nothing, also in the backward pass)."""
        y_KBD = y_KBD * self.valid_BK.T[..., None].to(y_KBD.dtype)
        idx_KBD = self.index_BK.T[..., None].expand(-1, -1, y_KBD.shape[-1])
        out = y_KBD.new_zeros(S, *y_KBD.shape[1:])
        return out.scatter_add(0, idx_KBD, y_KBD)

    def self_mask(self) -> torch.Tensor:
        """[B, 1, K, K], True = hidden: causal among the gathered tokens; pad keys hidden."""
        pos_BK = self.index_BK
        future = pos_BK[:, None, :] > pos_BK[:, :, None]          # key after query
        hidden = future | ~self.valid_BK[:, None, :]
        # a pad query still sees itself, so no row is fully hidden
        eye = torch.eye(self.size, dtype=torch.bool, device=pos_BK.device)
        hidden = hidden & ~(eye & ~self.valid_BK[:, :, None])
        return hidden[:, None]

    def shared_kv_mask(self, S: int) -> torch.Tensor:
        """[B, 1, K, S], True = hidden: gathered queries against all S first-recursion keys."""
        key_pos = torch.arange(S, device=self.index_BK.device)
        return (key_pos[None, None, :] > self.index_BK[:, :, None])[:, None]

    def rotary(self, freqs_S11d: torch.Tensor) -> torch.Tensor:
        """Megatron's rotary table of the full sequence [S, 1, 1, d] → the gathered tokens'
        original positions [K, B, 1, d]."""
        return freqs_S11d[:, 0, 0][self.index_BK.T][:, :, None, :]
