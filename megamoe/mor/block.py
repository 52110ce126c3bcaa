"""The recursion block of Mixture-of-Recursions (Bae et al., arXiv 2507.10524, §2.2; papers.md
§1.4–§1.6): a pool of shared Megatron-Core `TransformerLayer`s applied at N_r recursion steps,
each step running only the tokens its depth router keeps.

Per step r the kept tokens of every sequence are gathered into a compact batch (compaction.py),
the step's shared layers run on it (causal mask among them, RoPE at original positions), and the
result is scattered back:

- expert-choice (§1.4.6, `gating="weighted"`): H^{r+1}_t = H^r_t + g^r_t · f(H^r_t) for kept t,
  H^r_t otherwise; f is the full layer stack output *including its residual*
  (`gating="additive"`: H + f(H));
- token-choice (§1.5, the official code's rule): a token with depth i_t runs steps 0..i_t;
  H^{r+1} = f(H^r) for r < i_t, and the block output is H^1 + g_t · f(H^{i_t}).

KV strategies (§1.6): recursion-wise caching is what compaction computes; `kv_sharing=True`
makes steps r > 0 attend to the first recursion's K/V of the full sequence (attention.py).

Tensor + sequence parallelism (`sp_group`, the TP group when SP is on): the block's input and
output are this rank's SP shard [S/TP, B, D]. The block all-gathers the sequence, so that every
TP rank routes the same full sequence (identical selections, router forward and backward
replicated: router weights need no TP reduction), pads each compact batch to a multiple of TP
with masked pads, hands the shared layers SP shards of it and all-gathers their output. All pads
reach the shared layers as `padding_mask`, which their MoE routers honour (`run_step`). Every
gather is followed by computation replicated over TP, so its backward keeps this rank's slice of
the (identical) gradient instead of Megatron's default reduce-scatter (which would count it TP
times); scatters' backward all-gathers.

Shapes: S sequence, B batch, K gathered tokens, D hidden, d rotary dim. Hidden states are in
Megatron's [S, B, D] layout.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)

from megamoe.blocks.context import bind, bound_context
from megamoe.mor.attention import KVContext, MoRSelfAttention, RecursionKVCache
from megamoe.mor.compaction import Compaction
from megamoe.mor.expert_choice import ExpertChoiceDepthRouter
from megamoe.mor.token_choice import TokenChoiceDepthRouter


def mor_layer_spec(is_moe: bool, **layer_spec_kwargs):
    """megamoe's decoder layer spec (`models.specs.gpt_moe.layer_spec`, so MoE FFNs may sit in
    the shared layers) with `MoRSelfAttention` as its self-attention module."""
    from megamoe.specs.gpt_moe import layer_spec

    spec = layer_spec(is_moe, **layer_spec_kwargs)
    attn = dataclasses.replace(spec.submodules.self_attention, module=MoRSelfAttention)
    return dataclasses.replace(
        spec, submodules=dataclasses.replace(spec.submodules, self_attention=attn))


def build_shared_layers(tconfig, pool_slots, moe_slots, pg_collection, **layer_spec_kwargs):
    """One `TransformerLayer` per shared pool slot; layer_number = slot + 1 (the pool's own
    numbering, which Megatron's MoE loss tracker indexes) on every pipeline stage: Megatron
    adds its stage offset (layers per stage × PP rank) to the number it is given."""
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    from megatron.core.utils import get_pg_rank

    offset = get_transformer_layer_offset(tconfig, None, get_pg_rank(pg_collection.pp))
    return nn.ModuleList(
        build_module(mor_layer_spec(slot in moe_slots, pg_collection=pg_collection,
                                    **layer_spec_kwargs),
                     config=tconfig, layer_number=slot + 1 - offset, pg_collection=pg_collection)
        for slot in pool_slots)


class RecursionBlock(nn.Module):
    """`layers`: the shared pool (ModuleList); `steps[r]`: indices into `layers` applied at
    recursion step r (`SharingPlan.recursion_steps()`, mapped to this list)."""

    def __init__(self, layers: nn.ModuleList, steps, router, *, kv_sharing: bool = False,
                 gating: str = "weighted", sp_group=None):
        super().__init__()
        if gating not in ("weighted", "additive"):
            raise ValueError(f"model.mor.gating={gating!r}: weighted or additive")
        if len(steps) != router.num_recursions:
            raise ValueError(f"{len(steps)} recursion steps for a router of "
                             f"{router.num_recursions}")
        if kv_sharing and isinstance(router, ExpertChoiceDepthRouter) and router.capacities[0] < 1:
            raise ValueError("model.mor.kv_sharing needs capacity 1 at the first recursion "
                             f"(its K/V cover the whole sequence), got {router.capacities}")
        self.layers, self.steps, self.router = layers, [tuple(s) for s in steps], router
        self.kv_sharing, self.gating = kv_sharing, gating
        # the TP group under sequence parallelism (None: inputs hold the whole sequence)
        self.sp_group = sp_group if sp_group is not None and sp_group.size() > 1 else None
        self.lora = None                   # RecursionLoRA (lora.py): per-(r, j) adapters
        self.last_aux_loss = None          # the router's loss term of the last forward
        self.last_stats: dict = {}

    def forward(self, hidden_SBD: torch.Tensor, rotary_pos_emb: torch.Tensor,
                kv_cache: RecursionKVCache | None = None) -> torch.Tensor:
        """`rotary_pos_emb`: Megatron's rotary table of the full sequence, [S, 1, 1, d]."""
        if kv_cache is None and self.kv_sharing:
            kv_cache = RecursionKVCache()
        if self.sp_group is not None:       # [S/TP, B, D] → [S, B, D], replicated below
            hidden_SBD = gather_from_sequence_parallel_region(
                hidden_SBD, tensor_parallel_output_grad=False, group=self.sp_group)
        if isinstance(self.router, TokenChoiceDepthRouter):
            out_SBD = self._token_choice(hidden_SBD, rotary_pos_emb, kv_cache)
        else:
            out_SBD = self._expert_choice(hidden_SBD, rotary_pos_emb, kv_cache)
        if self.sp_group is not None:
            out_SBD = scatter_to_sequence_parallel_region(out_SBD, group=self.sp_group)
        return out_SBD

    def _expert_choice(self, h_SBD, rope_S11d, kv_cache):
        S = h_SBD.shape[0]
        prev, routed = None, []
        for r in range(len(self.steps)):
            step = self.router.step(r, h_SBD.transpose(0, 1), prev)
            comp = Compaction(step.selected_BK, step.valid_BK)
            # no early exit when nothing is kept: other ranks' MoE layers wait for this one
            f_KBD = self.run_step(r, h_SBD, comp, rope_S11d, kv_cache)
            h_SBD = h_SBD + comp.expand(self.gated(f_KBD, step.gate_BK.T), S)
            prev = step
            routed.append(step)
        self.last_aux_loss = self.router.total_loss(routed) if self.training else None
        self.last_stats = {f"step_{r}_{k}": v for r, s in enumerate(routed)
                           for k, v in s.stats.items()}
        return h_SBD

    def _token_choice(self, h_SBD, rope_S11d, kv_cache):
        S = h_SBD.shape[0]
        a = self.router(h_SBD.transpose(0, 1))
        depth_SB, gate_SB = a.depth_BS.T, a.gate_BS.T
        out_SBD, x_SBD = h_SBD, h_SBD
        for r in range(len(self.steps)):
            active_BS = a.depth_BS >= r      # may be empty: the step still runs (pads only)
            comp = Compaction.from_mask(active_BS)
            f_SBD = comp.expand(self.run_step(r, x_SBD, comp, rope_S11d, kv_cache), S)
            exit_SB1 = (depth_SB == r).to(f_SBD.dtype)[..., None]
            out_SBD = out_SBD + exit_SB1 * self.gated(f_SBD, gate_SB)   # H^1 + g·f(H^{i_t})
            x_SBD = torch.where(active_BS.T[..., None], f_SBD, x_SBD)
        self.last_aux_loss = self.router.total_loss(a) if self.training else None
        self.last_stats = a.stats
        return out_SBD

    def gated(self, f_XD: torch.Tensor, gate_X: torch.Tensor) -> torch.Tensor:
        """g·f (`gating` weighted) or f (additive): what a recursion step adds for its tokens
        (X: any leading shape, e.g. [K, B] here, [B] in cached generation)."""
        if self.gating == "weighted":
            return f_XD * gate_X[..., None].to(f_XD.dtype)
        return f_XD

    def run_step(self, r: int, h_SBD, comp: Compaction, rope_S11d, kv_cache) -> torch.Tensor:
        """The shared layers of step r on the gathered tokens: f(H) of those tokens, [K, B, D].
        Under SP the compact batch is padded to K_p, a multiple of TP, and sharded. Every pad
        (ragged token-choice rows, the one pad of an empty step, TP pads) is handed to the
        layers as `padding_mask` [B, K(/TP)]: shared MoE layers route it nowhere and leave it
        out of their losses and counts, so pads change no loss or gradient."""
        K = comp.size
        if self.sp_group is not None:
            comp = comp.padded(self.sp_group.size())
        x_KBD = comp.gather(h_SBD)
        S = h_SBD.shape[0]
        rope_q = comp.rotary(rope_S11d)
        sharing = self.kv_sharing and r > 0
        if sharing:
            mask, rope = comp.shared_kv_mask(S), (rope_q, rope_S11d)
        else:
            mask, rope = comp.self_mask(), rope_q
        if self.kv_sharing and r == 0:
            assert bool(comp.valid_BK.all()) and comp.size == S, "step 0 must keep every token"
        pad_BK = ~comp.valid_BK             # MoE routers leave pads out (Megatron's padding_mask)
        if self.sp_group is not None:       # [K_p, B, D] → this rank's [K_p/TP, B, D]
            x_KBD = scatter_to_sequence_parallel_region(x_KBD, group=self.sp_group)
            pad_BK = pad_BK.chunk(self.sp_group.size(), dim=1)[self.sp_group.rank()]
        # the shared layers read the compact batch's context (per-token fields gathered like
        # the hidden states; routers slice it per SP rank), bound until the step ends
        context = bound_context()
        with bind(None if context is None else context.compacted(comp.index_BK)):
            x_KBD = self._run_layers(r, x_KBD, comp, mask, rope, pad_BK, kv_cache, sharing)
        if self.sp_group is not None:
            x_KBD = gather_from_sequence_parallel_region(
                x_KBD, tensor_parallel_output_grad=False, group=self.sp_group)
        return x_KBD[:K]

    def _run_layers(self, r: int, x_KBD, comp: Compaction, mask, rope, pad_BK, kv_cache,
                    sharing: bool) -> torch.Tensor:
        for j, idx in enumerate(self.steps[r]):
            layer = self.layers[idx]
            attn = layer.self_attention
            attn.kv_context = KVContext(cache=kv_cache, key=(r, j), valid_NB=comp.valid_BK.T,
                                        read_from=(0, j) if sharing else None)
            if self.lora is not None:       # RRT: the adapters of unrolled position (r, j)
                self.lora.select(r, j)
            try:
                x_KBD, _ = layer(x_KBD, attention_mask=mask, rotary_pos_emb=rope,
                                 padding_mask=pad_BK)
            finally:
                attn.kv_context = None
                if self.lora is not None:
                    self.lora.select(None)
        return x_KBD
