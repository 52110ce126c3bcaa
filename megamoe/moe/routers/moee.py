"""MoEE soft mixing (Liu et al., "Mixture of Emotion Experts for Audio-Driven Portrait
Animation", arXiv 2501.01808, CVPR 2025, §3; papers.md §12): out = Σ_{i=1}^{n} w_i ⊙ E_i(h) with
w = softmax(gate(h)), a dense, weighted mixture of *all* experts.

Every token goes to every expert (routing map all True) with weight w_i = softmax(x Wᵀ)_i; the
gate is Megatron's router linear, so the ST-MoE z-loss (`model.moe.z_loss_coeff`) applies with
top-k's scale fixes. A load-balancing loss would be constant (f_i = 1 for every expert) and is
not attached. Per token, hence causal.

Not covered: the paper's per-sample "global" weight from the emotion latent (the LM has no
emotion latent; the gate's exact parameterisation is [unverified] in papers.md) — the mixing here
is the per-token "local" weight only.

Shapes: T tokens of this rank (S·B, Megatron order), E experts.
"""

from __future__ import annotations

import torch

from megamoe.blocks.context import Context
from megamoe.moe.routers.base import RouterOutput, routing_stats
from megamoe.moe.routers.topk import TopKSoftmaxRouter


def soft_mixing(logits_TE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights w = softmax over experts [T, E], routing map all True [T, E])."""
    probs_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    return probs_TE, torch.ones_like(probs_TE, dtype=torch.bool)


class MoEERouter(TopKSoftmaxRouter):
    paper = "MoEE soft mixing (Liu et al. 2025, arXiv 2501.01808, §3): w = softmax(gate(h))"
    selection_groups = ("token",)
    takes_padding_mask = False        # its own `route` (soft mixing over every expert)

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection, renormalize=False)

    def is_causal(self) -> bool:
        return True

    @classmethod
    def causal_for(cls, moe_cfg) -> bool:
        return True

    @classmethod
    def options_from(cls, moe_cfg) -> dict:
        return {}

    def routing_with_scores(self, logits, padding_mask=None):
        logits_TE = self.apply_z_loss(logits.view(-1, self.config.num_moe_experts))
        probs_TE, routing_map_TE = soft_mixing(logits_TE)
        return probs_TE, routing_map_TE, probs_TE.detach()

    def route(self, hidden_SBD: torch.Tensor, context: Context) -> RouterOutput:
        probs_TE, routing_map_TE, scores_TE = self.routing_with_scores(self.logits(hidden_SBD))
        stats = routing_stats(scores_TE, routing_map_TE, self.num_experts)
        return RouterOutput(probs_TE=probs_TE, routing_map_TE=routing_map_TE,
                            tokens_per_expert_E=routing_map_TE.sum(dim=0).detach(), stats=stats)

    def after_step(self) -> None:
        self.reset_global_aux_loss_tracker()
