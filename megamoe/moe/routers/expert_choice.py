"""Expert-choice routing (Zhou, Lei, Liu, Du, Huang, Zhao, Dai, Chen, Le, Laudon, "Mixture-of-
Experts with Expert Choice Routing", NeurIPS 2022, §3 Method): experts choose tokens.

    S = Softmax(X·W_g) ∈ R^{T×E}      scores over experts, per token
    G, I = TopK(Sᵀ, c)                 each expert takes its c tokens of largest S[:, e]
    c = ⌈k·T/E⌉                        the paper's k = n·c/e with n tokens and capacity factor
                                       c; here k = `model.moe.topk` (average experts per token)
    y_t = Σ_{e : t ∈ I_e} S[t, e]·FFN_e(x_t)

Every expert is exactly full (perfect load balance, no auxiliary loss); a token gets 0..E
experts. The selection group of T tokens is `model.moe.expert_choice.selection_group`: the
micro-batch (default), each sequence (a top-c per (sample, expert): the expert-choice baseline
of papers.md §7, one image each in a diffusion transformer) or micro-batch m of every
data-parallel rank together (the single-process reference holds them in one micro-batch). Under sequence parallelism
each TP rank holds a sequence shard, and the per-expert threshold (the c-th largest score; per
sample for `sequence`) is found over the whole group with `token_groups.kth_largest`, so any
layout routes like one process that sees the same groups. Ties at the threshold are all kept
(measure zero for float scores). Choosing tokens across the group lets later tokens change an
earlier token's experts: not causal, refused in the causal decoder without
`model.moe.allow_non_causal`.

Not implemented: the paper's optional cap on the experts per token (an entropy-regularised
linear program, which it found to hurt quality), and fractional capacity factors (k is the
integer `topk`). Token-choice options do not apply: `model.moe.aux_loss_coeff` is not used
(expert choice is balanced by construction); `capacity_factor` and `z_loss_coeff` are refused
when the config is validated (`megamoe.config.moe_families.ExpertChoiceOptions`).

Shapes: T tokens of this rank (S·B, Megatron order), E experts.
"""

from __future__ import annotations

import torch

from megatron.core.transformer.moe.moe_utils import get_capacity
from megatron.core.transformer.moe.router import Router

from megamoe.blocks.context import Context
from megamoe.config.moe_families import EXPERT_CHOICE_SELECTION_GROUPS
from megamoe.moe.routers.base import MegamoeRouter, RouterOutput, routing_stats
from megamoe.moe.routers.token_groups import SelectionGroup, selection_group


def expert_capacity(num_tokens: int, num_experts: int, k: int) -> int:
    """c = ⌈k·T/E⌉ tokens per expert, at most T."""
    return min(num_tokens, get_capacity(num_tokens, num_experts, capacity_factor=k))


def expert_choice(scores_TE: torch.Tensor, capacity: int,
                  groups: SelectionGroup = SelectionGroup("micro-batch"), batch: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(combine weights [T, E], routing map [T, E]): expert e takes the tokens whose score is at
    least the c-th largest of column e over their selection group's tokens (this rank's and
    those of `groups.group`'s ranks; `batch` samples B, for per-sequence groups)."""
    threshold_TE = groups.kth_largest(scores_TE.detach(), capacity, batch)
    routing_map_TE = scores_TE.detach() >= threshold_TE
    return scores_TE * routing_map_TE, routing_map_TE


@torch.no_grad()
def expert_choice_stats(scores_TE: torch.Tensor, routing_map_TE: torch.Tensor, k: int) -> dict:
    """`routing_stats`, except that "dropped_fraction" is the share of this rank's tokens that
    got no expert (they pass through the residual only): the group's k·T assignments are always
    made, and a rank's own count only says how the group's budget fell on its tokens."""
    stats = routing_stats(scores_TE, routing_map_TE, k)
    stats["dropped_fraction"] = (~routing_map_TE.any(dim=-1)).float().mean().item()
    return stats


class ExpertChoiceRouter(Router, MegamoeRouter):
    paper = "Expert choice (Zhou et al. 2022) §3: each expert takes its top-k·T/E tokens"
    causal = False
    selection_groups = EXPERT_CHOICE_SELECTION_GROUPS
    selection_option = "model.moe.expert_choice.selection_group"

    def __init__(self, config, pg_collection=None, *, selection: str = "micro-batch"):
        super().__init__(config=config, pg_collection=pg_collection)
        assert selection in self.selection_groups, selection
        self.topk = config.moe_router_topk
        self.groups = selection_group(selection, pg_collection, config.sequence_parallel)

    @classmethod
    def options_from(cls, moe_cfg) -> dict:
        return {"selection": cls.selection_group_for(moe_cfg)}

    def routing(self, logits: torch.Tensor, padding_mask=None):
        """Megatron's `Router.routing` interface (see `routing_with_stats`)."""
        return self.routing_with_stats(logits)[:2]

    def routing_with_stats(self, logits: torch.Tensor):
        """(combine weights [T, E], routing map [T, E], statistics): each expert takes its
        top-capacity tokens of the selection group."""
        assert logits.dim() == 3 or self.groups.kind != "sequence", "needs [S, B, E] logits"
        B = logits.shape[1] if logits.dim() == 3 else 1          # [S, B, E] from `gating`
        logits_TE = logits.view(-1, self.num_experts)
        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        N = self.groups.num_tokens(scores_TE.shape[0], B)
        capacity = expert_capacity(N, self.num_experts, self.topk)
        probs_TE, routing_map_TE = expert_choice(scores_TE, capacity, self.groups, B)
        stats = expert_choice_stats(scores_TE, routing_map_TE, self.topk)
        stats["capacity"] = float(capacity)
        return probs_TE, routing_map_TE, stats

    def forward(self, input: torch.Tensor, padding_mask=None):
        return self.routing(self.gating(input))

    def route(self, hidden_SBD: torch.Tensor, context: Context) -> RouterOutput:
        probs_TE, routing_map_TE, stats = self.routing_with_stats(self.gating(hidden_SBD))
        return RouterOutput(probs_TE=probs_TE, routing_map_TE=routing_map_TE,
                            tokens_per_expert_E=routing_map_TE.sum(dim=0).detach(), stats=stats)
