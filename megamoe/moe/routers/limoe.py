"""LIMoE entropy losses (Mustafa et al., "Multimodal Contrastive Learning with LIMoE",
arXiv 2206.02770, 2022: the local, global and thresholded global entropy losses; papers.md §5,
no official code) on top of V-MoE routing.

For each modality m with tokens G_m in the micro-batch and router probabilities p(e|x):
- local entropy  Ω_local(G_m)  = (1/|G_m|) Σ_{x∈G_m} H(p(·|x))   (confident routing per token);
- global entropy Ω_global(G_m) = −H(p̃_m), p̃_m = (1/|G_m|) Σ_{x∈G_m} p(·|x)   (use many experts);
- thresholded    Ω^τ_global    = max(0, τ + Ω_global): with τ = log n the modality is pushed to
  use about n experts and no more (a soft minimum).
Loss = Σ_m local_coeff[m]·Ω_local + global_coeff[m]·Ω^τ_global (τ = global_threshold[m], None:
no threshold), added to V-MoE's importance and load losses.

Routing is V-MoE's (`model.moe.vmoe`: noisy top-k, optional capacity and BPR), as in the paper.
p(e|x) is the softmax of the *clean* logits (the same distribution V-MoE's importance loss
uses), so the losses do not depend on the routing noise. Modality ids come from the routing
context; under TP + SP the partial sums (Σ H, Σ p, counts) are all-reduced over the TP group.
Causal when V-MoE's capacity is off (the losses shape gradients, not the forward).

Shapes: T tokens of this rank, E experts, M modalities.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamoe.blocks.context import Context
from megamoe.moe.routers.token_groups import SequenceShards
from megamoe.moe.routers.vmoe import VMoERouter


def checked_modalities(context: Context, shards: SequenceShards, num_modalities: int,
                       section: str) -> torch.Tensor:
    """[T] modality ids of this rank's tokens, each in [0, num_modalities)."""
    modality_T = context.tokens("modality_ids_BS", shards.rank, shards.size)
    low, high = int(modality_T.min()), int(modality_T.max())
    if low < 0 or high >= num_modalities:
        raise ValueError(f"{section}: configured for {num_modalities} modalities, but the batch "
                         f"has modality ids in [{low}, {high}]")
    return modality_T


def entropy(p_xE: torch.Tensor) -> torch.Tensor:
    """H(p) = −Σ_e p log p along the last dim (0·log 0 = 0)."""
    return -(p_xE * p_xE.clamp_min(1e-20).log()).sum(dim=-1)


def modality_entropies(probs_TE: torch.Tensor, modality_T: torch.Tensor, num_modalities: int,
                       shards: SequenceShards | None = None):
    """(Ω_local [M], Ω_global [M], tokens [M]) over the micro-batch; modalities without tokens
    get 0 for both."""
    onehot_TM = F.one_hot(modality_T.long(), num_modalities).to(probs_TE.dtype)
    sums_M = onehot_TM.t() @ entropy(probs_TE)[:, None]           # Σ_x H(p_x)   [M, 1]
    sums_ME = onehot_TM.t() @ probs_TE                              # Σ_x p_x      [M, E]
    counts_M = onehot_TM.sum(0).detach()
    if shards is not None:
        sums_M, sums_ME = shards.sum_over_ranks(sums_M), shards.sum_over_ranks(sums_ME)
        counts_M = shards.sum_over_ranks(counts_M)
    present_M = counts_M > 0
    denom_M1 = counts_M.clamp_min(1)[:, None]
    local_M = (sums_M / denom_M1).squeeze(1)
    global_M = torch.where(present_M, -entropy(sums_ME / denom_M1), torch.zeros_like(local_M))
    return local_M, global_M, counts_M


def limoe_loss(local_M, global_M, counts_M, local_coeff, global_coeff, global_threshold):
    """(weighted total, {name: unweighted term}) of the per-modality entropy losses."""
    total, terms = local_M.new_zeros(()), {}
    for m in range(local_M.shape[0]):
        if counts_M[m] == 0:
            continue
        glob = global_M[m]
        if global_threshold[m] is not None:
            glob = torch.clamp_min(global_threshold[m] + glob, 0.0)   # max(0, τ + Ω_global)
        total = total + local_coeff[m] * local_M[m] + global_coeff[m] * glob
        terms[f"local_entropy_m{m}"], terms[f"global_entropy_m{m}"] = local_M[m], glob
    return total, terms


class LIMoERouter(VMoERouter):
    paper = ("LIMoE (Mustafa et al. 2022) local/global/thresholded entropy losses per "
             "modality, on V-MoE routing (Riquelme et al. 2021)")
    needs_context = ("modality_ids_BS",)

    def __init__(self, config, pg_collection=None, *, local_coeff=(0.0,), global_coeff=(0.0,),
                 global_threshold=(None,), **vmoe_options):
        super().__init__(config, pg_collection, **vmoe_options)
        assert len(local_coeff) == len(global_coeff) == len(global_threshold)
        self.num_modalities = len(local_coeff)
        self.local_coeff, self.global_coeff = list(local_coeff), list(global_coeff)
        self.global_threshold = list(global_threshold)

    @classmethod
    def options_from(cls, moe_cfg) -> dict:
        opts = moe_cfg.limoe
        return {**VMoERouter.options_from(moe_cfg), "local_coeff": opts.local_coeff,
                "global_coeff": opts.global_coeff, "global_threshold": opts.global_threshold}

    def extra_losses(self, logits_TE: torch.Tensor, context: Context, stats: dict) -> dict:
        modality_T = checked_modalities(context, self.shards, self.num_modalities,
                                        "model.moe.limoe")
        local_M, global_M, counts_M = modality_entropies(
            torch.softmax(logits_TE, dim=-1), modality_T.to(logits_TE.device),
            self.num_modalities, self.shards)
        total, terms = limoe_loss(local_M, global_M, counts_M, self.local_coeff,
                                  self.global_coeff, self.global_threshold)
        stats.update({k: v.item() for k, v in terms.items()})
        return {"entropy_loss": total}

    def route(self, hidden_SBD, context):
        context.require("modality_ids_BS", "model.moe.router 'limoe'")
        return super().route(hidden_SBD, context)
