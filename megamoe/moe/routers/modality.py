"""Modality experts: routing by the token's modality id (routing context).

- `vlmo` (Bao et al., "VLMo: Unified Vision-Language Pre-Training with Mixture-of-Modality-
  Experts", arXiv 2111.02358: the MoME Transformer block; papers.md §10; `microsoft/unilm`
  `vlmo/modules/multiway_transformer.py`): deterministic routing, no learned router and no aux
  loss. Modality m goes to expert m with weight 1 (V-FFN, L-FFN, …); in the top
  `vl_ffn_layers` layers of the model every token goes to the VL expert (expert index M), as
  VLMo's image-text input does from `vlffn_start_layer_index` = num_layers − vl_ffn_layers on.
  Experts beyond those used stay idle. The gating linear exists (Megatron's router owns it) but
  is unused: its gradient is 0.
- `pools` (Li et al., "Uni-MoE: Scaling Unified Multimodal LLMs with MoE", IEEE TPAMI 2025:
  the sparse MoE layer; papers.md §11; `Uni_MoE_speech/model/moe/moe.py`): modality m owns a pool of
  consecutive experts (`pool_sizes`); the token takes the top-k of its router logits *within its
  pool* and the combine weights are the softmax over the k selected logits only (Mixtral-style).
  No aux loss (the released MoeLayer has none; papers.md marks a Switch loss [unverified]).

Both are per-token decisions: causal. Shapes: T tokens of this rank, E experts, M modalities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron.core.transformer.moe.router import TopKRouter

from megamoe.blocks.context import Context
from megamoe.moe.routers.base import MegamoeRouter, RouterOutput, routing_stats
from megamoe.moe.routers.limoe import checked_modalities
from megamoe.moe.routers.token_groups import SequenceShards, selection_group

MODES = ("vlmo", "pools")


def pool_mask(pool_sizes: list[int], num_experts: int) -> torch.Tensor:
    """[M, E] bool: expert e is in modality m's pool (consecutive blocks)."""
    mask_ME = torch.zeros(len(pool_sizes), num_experts, dtype=torch.bool)
    start = 0
    for m, size in enumerate(pool_sizes):
        mask_ME[m, start:start + size] = True
        start += size
    return mask_ME


def pool_topk(logits_TE: torch.Tensor, allowed_TE: torch.Tensor, k: int):
    """(combine weights [T, E], routing map [T, E]): top-k logits among the allowed experts,
    weights = softmax over the k selected logits."""
    top = torch.topk(logits_TE.masked_fill(~allowed_TE, float("-inf")), k, dim=-1)
    weights_Tk = torch.softmax(top.values, dim=-1)
    probs_TE = torch.zeros_like(logits_TE).scatter(1, top.indices, weights_Tk)
    routing_map_TE = torch.zeros_like(allowed_TE).scatter(1, top.indices, True)
    return probs_TE, routing_map_TE


def vlmo_experts(modality_T: torch.Tensor, num_modalities: int, vl_layer: bool) -> torch.Tensor:
    """[T] expert of each token: its modality's, or the VL expert (index M) in the top layers."""
    return torch.full_like(modality_T, num_modalities) if vl_layer else modality_T


class ModalityRouter(TopKRouter, MegamoeRouter):
    paper = ("VLMo (Bao et al. 2021) mixture-of-modality-experts (MoME) block; Uni-MoE (Li et "
             "al. 2025) modality expert pools with sparse top-k")
    causal = True
    selection_groups = ("token",)
    needs_context = ("modality_ids_BS",)
    takes_padding_mask = True

    def __init__(self, config, pg_collection=None, *, mode: str = "vlmo",
                 num_modalities: int = 2, vl_ffn_layers: int = 0,
                 pool_sizes: list[int] | None = None):
        super().__init__(config=config, pg_collection=pg_collection)
        assert mode in MODES, mode
        self.mode, self.num_modalities, self.vl_ffn_layers = mode, num_modalities, vl_ffn_layers
        E = config.num_moe_experts
        if mode == "pools":
            sizes = pool_sizes or [E // num_modalities] * num_modalities
            assert sum(sizes) == E and min(sizes) >= self.topk, (sizes, E, self.topk)
            self.register_buffer("pool_mask_ME", pool_mask(sizes, E), persistent=False)
        self.shards = SequenceShards(selection_group("micro-batch", pg_collection,
                                                     config.sequence_parallel).group)

    @classmethod
    def options_from(cls, moe_cfg) -> dict:
        o = moe_cfg.modality
        return {"mode": o.mode, "num_modalities": o.num_modalities,
                "vl_ffn_layers": o.vl_ffn_layers, "pool_sizes": list(o.pool_sizes)}

    def is_vl_layer(self) -> bool:
        """Megatron's layer numbers are 1-based over the whole model (all pipeline stages)."""
        assert self.layer_number is not None, "set_layer_number was not called"
        return self.layer_number > self.config.num_layers - self.vl_ffn_layers

    def route(self, hidden_SBD: torch.Tensor, context: Context,
              padding_mask: torch.Tensor | None = None) -> RouterOutput:
        """`padding_mask` (bool [S, B], True = pad): pads go to no expert and count in no
        statistic (no loss here to keep them out of)."""
        context.require("modality_ids_BS", f"model.moe.router 'modality' ({self.mode})")
        modality_T = checked_modalities(context, self.shards, self.num_modalities,
                                        "model.moe.modality.num_modalities")
        S, B = hidden_SBD.shape[:2]
        E = self.config.num_moe_experts
        modality_T = modality_T.to(hidden_SBD.device)
        if self.mode == "vlmo":
            expert_T = vlmo_experts(modality_T, self.num_modalities, self.is_vl_layer())
            routing_map_TE = F.one_hot(expert_T.long(), E).bool()
            probs_TE = scores_TE = routing_map_TE.float()
            k = 1
        else:
            logits_TE = self.gating(hidden_SBD).reshape(S * B, E)
            allowed_TE = self.pool_mask_ME[modality_T.long()]
            probs_TE, routing_map_TE = pool_topk(logits_TE, allowed_TE, self.topk)
            scores_TE = torch.softmax(logits_TE.detach().masked_fill(~allowed_TE, float("-inf")),
                                      dim=-1)
            k = self.topk
        if padding_mask is not None:
            real_T = ~padding_mask.reshape(-1)
            probs_TE, routing_map_TE = probs_TE * real_T[:, None], routing_map_TE & real_T[:, None]
            stats = routing_stats(scores_TE[real_T], routing_map_TE[real_T], k)
        else:
            stats = routing_stats(scores_TE, routing_map_TE, k)
        return RouterOutput(probs_TE=probs_TE, routing_map_TE=routing_map_TE,
                            tokens_per_expert_E=routing_map_TE.sum(dim=0).detach(), stats=stats)
