"""Expert-choice routing (Zhou, Lei, Liu, Du, Huang, Zhao, Dai, Chen, Le, Laudon, "Mixture-of-
Experts with Expert Choice Routing", NeurIPS 2022, §3 Method): experts choose tokens.

    S = Softmax(X·W_g) ∈ R^{T×E}      scores over experts, per token
    G, I = TopK(Sᵀ, c)                 each expert takes its c tokens of largest S[:, e]
    c = ⌈k·T/E⌉                        the paper's k = n·c/e with n tokens and capacity factor
                                       c; here k = `model.moe.topk` (average experts per token)
    y_t = Σ_{e : t ∈ I_e} S[t, e]·FFN_e(x_t)

Every expert is exactly full (perfect load balance, no auxiliary loss); a token gets 0..E
experts. The selection group of T tokens is the micro-batch: under sequence parallelism each TP
rank holds a sequence shard, and the per-expert threshold (the c-th largest score) is found over
the whole micro-batch with `token_groups.kth_largest`, so any layout routes like one process
that sees the same micro-batch. Ties at the threshold are all kept (measure zero for float
scores). Choosing tokens across the micro-batch lets later tokens change an earlier token's
experts: not causal, refused in the causal decoder without `model.moe.allow_non_causal`.

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

from megamoe.moe.routers.base import MegamoeRouter, RouterOutput, routing_stats
from megamoe.moe.routers.token_groups import group_size, kth_largest, selection_group
from megamoe.moe.routing_context import RoutingContext


def expert_capacity(num_tokens: int, num_experts: int, k: int) -> int:
    """c = ⌈k·T/E⌉ tokens per expert, at most T."""
    return min(num_tokens, get_capacity(num_tokens, num_experts, capacity_factor=k))


def expert_choice(scores_TE: torch.Tensor, capacity: int, group=None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(combine weights [T, E], routing map [T, E]): expert e takes the tokens whose score is at
    least the c-th largest of column e over the group's tokens (this rank's and `group`'s)."""
    threshold_E = kth_largest(scores_TE.detach(), capacity, group)
    routing_map_TE = scores_TE.detach() >= threshold_E
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
    token_group = "micro-batch"

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.topk = config.moe_router_topk
        self.group = selection_group(pg_collection, config.sequence_parallel,
                                     across_data_parallel=False)
        self._last_stats: dict = {}

    def routing(self, logits: torch.Tensor):
        logits_TE = logits.view(-1, self.num_experts)
        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        T = scores_TE.shape[0]
        capacity = expert_capacity(T * group_size(self.group), self.num_experts, self.topk)
        probs_TE, routing_map_TE = expert_choice(scores_TE, capacity, self.group)
        stats = expert_choice_stats(scores_TE, routing_map_TE, self.topk)
        stats["capacity"] = float(capacity)
        self._last_stats = stats
        return probs_TE, routing_map_TE

    def forward(self, input: torch.Tensor, padding_mask=None):
        return self.routing(self.gating(input))

    def route(self, hidden_SBD: torch.Tensor, context: RoutingContext) -> RouterOutput:
        probs_TE, routing_map_TE = self.forward(hidden_SBD)
        return RouterOutput(probs_TE=probs_TE, routing_map_TE=routing_map_TE,
                            tokens_per_expert_E=routing_map_TE.sum(dim=0).detach(),
                            stats=self._last_stats)
