"""Self-attention for shared recursion layers: Megatron's `SelfAttention` plus a per-call KV
context, for the two KV strategies of Mixture-of-Recursions (Bae et al., arXiv 2507.10524, §2.2.2;
papers.md §1.6; official `model/kv_caches/cache_utils.py`).

- recursion-wise caching: nothing to change in the module; compaction makes step r attend to
  the tokens active at step r. A `RecursionKVCache` given in the context records the K/V that a
  decoder's cache would hold (the valid tokens of every layer application), to measure memory.
- recursive KV sharing: at step 0 (every token passes) the layer stores its K/V; at step r > 0
  the gathered queries attend to that stored K/V of the whole sequence (the block passes a
  [K, S] mask and RoPE as a (query, key) pair), and the step writes no K/V of its own.

For cached generation (megamoe.mor.generate) a `DecodeKV` context hands the module the batch's
cached K/V instead: the new tokens' queries attend to that past (and, unless the step reuses
the first recursion's K/V, to their own new K/V, which the context returns for the caller to
store).

K/V are stored after the (optional) key layernorm and before RoPE, as Megatron applies RoPE
inside `forward` after `get_query_key_value_tensors`. Shapes: N tokens (S or gathered K),
B batch, G query groups of this TP rank, h head dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from megatron.core.transformer.attention import SelfAttention


@dataclass
class RecursionKVCache:
    """K/V per (recursion step, layer within the step), valid tokens only."""
    entries: dict = field(default_factory=dict)      # (r, j) -> (k_NBGh, v_NBGh, valid_NB)

    def put(self, key, k_NBGh, v_NBGh, valid_NB) -> None:
        self.entries[key] = (k_NBGh, v_NBGh, valid_NB)

    def get(self, key):
        return self.entries[key]

    def numel(self) -> int:
        """Elements a decoder's cache would hold: K and V of every valid token."""
        total = 0
        for k, v, valid in self.entries.values():
            per_token = k.shape[-2] * k.shape[-1] + v.shape[-2] * v.shape[-1]
            total += int(valid.sum().item()) * per_token
        return total


@dataclass
class KVContext:
    """Set by the recursion block on each attention module before a layer call."""
    cache: Optional[RecursionKVCache]
    key: tuple                              # (r, j): this call's slot
    valid_NB: torch.Tensor                  # bool, tokens of this call that are not pads
    read_from: Optional[tuple] = None       # (0, j) under recursive KV sharing at r > 0


@dataclass
class DecodeKV:
    """Set by the generator before a layer call on Q new tokens (one per sequence): the cached
    K/V of each sequence, padded to L ([L, B, G, h]; the caller masks the pads). `append`:
    keys = past + this call's K/V (recursion-wise caching, unique layers); False: past only
    (recursive KV sharing at r > 0: the first recursion's K/V already hold this token).
    `new_kv` receives this call's (k, v), [Q, B, G, h], pre-RoPE."""
    past_k_LBGh: torch.Tensor
    past_v_LBGh: torch.Tensor
    append: bool = True
    new_kv: Optional[tuple] = None


class MoRSelfAttention(SelfAttention):
    """`SelfAttention` that can store or reuse K/V per call (see the module docstring)."""

    kv_context: Optional[KVContext | DecodeKV] = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None,
                                    output_gate: bool = False, split_qkv: bool = True):
        out = super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                  output_gate=output_gate, split_qkv=split_qkv)
        ctx = self.kv_context
        if ctx is None:
            return out
        assert split_qkv, "MoR KV contexts need the split q/k/v path (no fused qkv RoPE)"
        query, key, value, *gate = out
        if isinstance(ctx, DecodeKV):
            ctx.new_kv = (key, value)
            if ctx.append:
                key = torch.cat([ctx.past_k_LBGh.to(key.dtype), key])
                value = torch.cat([ctx.past_v_LBGh.to(value.dtype), value])
            else:
                key, value = ctx.past_k_LBGh, ctx.past_v_LBGh
            return (query, key, value, *gate)
        if ctx.read_from is not None:
            key, value, _ = ctx.cache.get(ctx.read_from)
        elif ctx.cache is not None:
            ctx.cache.put(ctx.key, key, value, ctx.valid_NB)
        return (query, key, value, *gate)
