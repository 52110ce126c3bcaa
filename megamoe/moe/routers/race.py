"""Expert Race (Yuan et al. 2025, "Expert Race: A Flexible Routing Strategy for Scaling
Diffusion Transformer with Mixture of Experts", arXiv 2503.16057, Eq. 9-11; papers.md §7):
tokens and experts race together for one global budget.

    S = X·W_g                       identity gating: raw logits, comparable across tokens
    τ = 𝒦-th largest of S over the group's tokens × experts,   𝒦 = N·k
    M = 1[S ≥ τ],   y_t = Σ_e M_te·S_te·FFN_e(x_t)     (a token gets 0..E experts)

N is the number of tokens of the selection group and k = `model.moe.topk`. The group
(`model.moe.race.selection_group`) is by default the data-parallel group's micro-batch, the
paper's batch-wide race: micro-batch m of every DP rank (and, under sequence parallelism, every
TP rank's sequence shard of it), i.e. Megatron's `tp_dp_cp` group (`dp_cp` without SP). τ is
found by `token_groups.kth_largest` without gathering the scores. The single-process reference
that a parallel run must match is therefore the run whose one micro-batch holds all DP ranks'
micro-batch m (micro_batch_size · DP samples: the global batch order puts exactly those samples
together), see tests/distributed/test_family_race.py. With `micro-batch` each micro-batch races
on its own (routing then does not depend on the DP size) and τ̄ below is averaged over the DP
ranks' micro-batches.

Training uses the batch threshold τ; it also keeps τ_ema (model state, checkpointed):
    τ_ema ← m·τ_ema + (1−m)·τ̄      once per optimizer step, τ̄ = mean τ of the step's
                                    micro-batches (a mean: activation recomputation, which
                                    runs a forward twice, leaves it as is); the first update
                                    sets τ_ema = τ̄
and evaluation routes with M = 1[S ≥ τ_ema], which is batch-independent (the "learnable
threshold" ablation, papers.md §7). m = `model.moe.race.ema_momentum`, 0.95 by default
[unverified: one reimplementation uses 0.95, the other 0.99]. Before the first update
τ_ema = 0.

Router-similarity loss (papers.md §7, §14 T11), with P = softmax(S) over experts (N×E) and
M' = MᵀM, P' = PᵀP summed over the group:
    W_ii = E·M'_ii / Σ_j M'_jj,   W_ij = (E²−E)·M'_ij / Σ_{k≠l} M'_kl  (i ≠ j; 0 if the sum is 0)
    L_sim = Σ_ij W_ij·P'_ij / N
The normalisation is uncertain (papers.md §16.6): `similarity_divisor` tokens (÷N, T11) or
tokens_experts (÷N·E), `similarity_off_diagonal` off_diagonal (as above) or all (Σ over all of
M'); the second reimplementation papers.md cites is tokens_experts + all. Weight
`similarity_loss_coeff` [unverified; 1e-5 in one reimplementation]. Each rank adds W ⊙ its
own PᵀP, so the group's ranks sum to L_sim; under Megatron's per-token loss it is attached with
the group's token count N, which makes the gradient that of one process adding coeff·L_sim
once per group micro-batch.

The score function may be switched to sigmoid or softmax (`race.gating`, the paper's
ablation); identity is the paper's choice.

Per-layer regularisation (PLR, papers.md §7), with `race.plr_coeff` > 0: the router becomes a
2-layer MLP, h = GELU(W_h·x), S = W_g·h, and a second head (W_y, no biases) predicts the
model's training target from h, weighted by `plr_coeff` [unverified: the paper's weight was not
retrieved]. The head exists only for training; routing (and so inference) uses W_h and W_g.
- Diffusion (the paper's; the dit family passes `plr_regression_size` = p²·C): ŷ_t = W_y·h_t ∈
  R^{p²·C} against the patchified diffusion target y_t of the context (`targets_BSP`: v = ε − x
  or ε, the main loss's), L_PLR = mean over the image's S tokens and p²·C values of (ŷ − y)²,
  the main loss's normalisation (per-image MSE), so coeff·Σ_l L_PLR,l sits on the paper's
  Σ_l ‖ŷ_l − y‖² up to that constant. Each rank adds Σ over its tokens of (ŷ − y)² / (S·p²·C)
  with S the image's whole token count (its sequence shard's tokens under SP), so the TP ranks'
  shares sum to the image's value whatever the layout; Megatron then divides by the global
  image count, as for the main loss.
- Language model: the target is the next token, so W_y is Linear_{D→V} with cross-entropy
  against the labels of the routing context, a per-token sum like the LM loss (each rank adds
  its tokens' CE; Megatron divides every gradient by the global token count).

Token-choice options: `model.moe.aux_loss_coeff` is not used;
`capacity_factor` and `z_loss_coeff` are refused when the config is validated
(`megamoe.config.moe_families.RaceOptions`).

Not causal in training (later tokens, and other samples, move τ), so it is refused in the causal
decoder without `model.moe.allow_non_causal`; evaluation with τ_ema is causal.

Shapes: T tokens of this rank (S·B, Megatron order), E experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import Router

from megamoe.blocks.context import Context
from megamoe.config.moe_families import (
    RACE_GATINGS,
    RACE_SELECTION_GROUPS,
    RACE_SIMILARITY_DIVISORS,
    RACE_SIMILARITY_OFF_DIAGONALS,
)
from megamoe.moe.routers.base import MegamoeRouter, RouterOutput
from megamoe.moe.routers.expert_choice import expert_choice_stats
from megamoe.moe.routers.token_groups import (
    all_reduce_sum,
    group_size,
    kth_largest,
    selection_group,
)


def race_scores(logits_TE: torch.Tensor, gating: str) -> torch.Tensor:
    if gating == "identity":
        return logits_TE.float()
    if gating == "sigmoid":
        return torch.sigmoid(logits_TE.float())
    return torch.softmax(logits_TE, dim=-1, dtype=torch.float32)


def race_threshold(scores_TE: torch.Tensor, k: int, group=None) -> torch.Tensor:
    """τ: the 𝒦-th largest score over the group's tokens × experts, 𝒦 = N·k (0-dim)."""
    budget = scores_TE.shape[0] * group_size(group) * k
    return kth_largest(scores_TE.detach().reshape(-1, 1), budget, group)[0]


def similarity_weights(coactive_EE: torch.Tensor, off_diagonal: str) -> torch.Tensor:
    """W from the co-activation counts M' = MᵀM (papers.md §7)."""
    E = coactive_EE.shape[0]
    diag_E = coactive_EE.diagonal()
    eye = torch.eye(E, dtype=torch.bool, device=coactive_EE.device)
    off_sum = coactive_EE.sum() - (diag_E.sum() if off_diagonal == "off_diagonal" else 0)
    w_diag = E * diag_E / diag_E.sum().clamp_min(1e-20)
    w_off = (E * E - E) * coactive_EE / off_sum.clamp_min(1e-20)
    return torch.where(eye, torch.diag(w_diag), w_off)


def router_similarity_loss(logits_TE: torch.Tensor, mask_TE: torch.Tensor, group=None,
                           divisor: str = "tokens", off_diagonal: str = "off_diagonal"
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's share of L_sim, with gradient; L_sim of the whole group, detached). The
    shares of the group's ranks sum to L_sim."""
    E = logits_TE.shape[-1]
    P_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    M_TE = mask_TE.float()
    local_PP_EE = P_TE.t() @ P_TE
    sums_2EE = torch.stack([M_TE.t() @ M_TE, local_PP_EE.detach()])
    all_reduce_sum(sums_2EE, group)
    W_EE = similarity_weights(sums_2EE[0], off_diagonal)
    N = logits_TE.shape[0] * group_size(group)
    norm = N * (E if divisor == "tokens_experts" else 1)
    return (W_EE * local_PP_EE).sum() / norm, (W_EE * sums_2EE[1]).sum() / norm


class RaceRouter(Router, MegamoeRouter):
    paper = ("Expert Race (Yuan et al. 2025, Race-DiT) Eq. 9-11: global top-N·k over tokens x "
             "experts, EMA threshold at inference, router-similarity loss")
    causal = False
    selection_groups = RACE_SELECTION_GROUPS
    selection_option = "model.moe.race.selection_group"
    needs_vocab_size = True

    @classmethod
    def extra_parameters(cls, moe_cfg, hidden: int, vocab_size: int) -> tuple[int, int]:
        """The PLR head (hidden [D, D], target [V, D]) when `race.plr_coeff` > 0; V is what
        the head predicts per token (the vocabulary, or the DiT's p²·C target values)."""
        n = hidden * hidden + vocab_size * hidden if moe_cfg.race.plr_coeff > 0 else 0
        return n, n

    def __init__(self, config, pg_collection=None, *, gating: str = "identity",
                 ema_momentum: float = 0.95, similarity_loss_coeff: float = 1e-5,
                 similarity_divisor: str = "tokens", similarity_off_diagonal: str = "off_diagonal",
                 plr_coeff: float = 0.0, vocab_size: int | None = None,
                 plr_regression_size: int | None = None, selection: str = "data-parallel"):
        super().__init__(config=config, pg_collection=pg_collection)
        self.plr_coeff = plr_coeff
        # a diffusion model's per-token target width p²·C (MSE); None: next tokens (CE)
        self.plr_regression_size = plr_regression_size
        if plr_coeff > 0:
            width = plr_regression_size or vocab_size
            assert width, "PLR predicts the target: the router needs its size per token"
            D = config.hidden_size
            self.plr_hidden = torch.nn.Parameter(torch.empty(D, D, dtype=torch.float32))
            self.plr_target = torch.nn.Parameter(torch.empty(width, D, dtype=torch.float32))
            for w in (self.plr_hidden, self.plr_target):
                if config.perform_initialization:
                    config.init_method(w)
                setattr(w, "sequence_parallel", config.sequence_parallel)  # replicated over TP
        self.sp_rank, self.sp_size = ((self.tp_group.rank(), self.tp_group.size())
                                      if config.sequence_parallel else (0, 1))
        assert gating in RACE_GATINGS and similarity_divisor in RACE_SIMILARITY_DIVISORS
        assert similarity_off_diagonal in RACE_SIMILARITY_OFF_DIAGONALS
        assert config.calculate_per_token_loss, "the similarity loss scale assumes per-token loss"
        self.topk = config.moe_router_topk
        self.gating_function = gating
        self.ema_momentum = ema_momentum
        self.similarity_loss_coeff = similarity_loss_coeff
        self.similarity_divisor = similarity_divisor
        self.similarity_off_diagonal = similarity_off_diagonal
        assert selection in self.selection_groups, selection
        self.group = selection_group(selection, pg_collection, config.sequence_parallel).group
        # a group within each DP rank: τ differs between them, τ̄ is their mean
        self.average_over_dp = selection != "data-parallel"
        # model state: τ_ema and how many times it was updated (0: not yet)
        self.register_buffer("threshold_ema", torch.zeros(1, dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros(1, dtype=torch.float32))
        # Σ τ and the micro-batch count of the current step
        self.register_buffer("step_thresholds", torch.zeros(2, dtype=torch.float32),
                             persistent=False)

    @classmethod
    def options_from(cls, moe_cfg) -> dict:
        o = moe_cfg.race
        return {"gating": o.gating, "ema_momentum": o.ema_momentum,
                "similarity_loss_coeff": o.similarity_loss_coeff,
                "similarity_divisor": o.similarity_divisor,
                "similarity_off_diagonal": o.similarity_off_diagonal, "plr_coeff": o.plr_coeff,
                "selection": cls.selection_group_for(moe_cfg)}

    def routing(self, logits: torch.Tensor, padding_mask=None):
        """Megatron's `Router.routing` interface (see `routing_with_stats`)."""
        return self.routing_with_stats(logits)[:2]

    def routing_with_stats(self, logits: torch.Tensor):
        """(combine weights [T, E], routing map [T, E], statistics) of the race over the
        selection group (training) or against τ_ema (evaluation)."""
        logits_TE = logits.view(-1, self.num_experts).float()
        scores_TE = race_scores(logits_TE, self.gating_function)
        learning = self.training and torch.is_grad_enabled()
        if self.training:
            tau = race_threshold(scores_TE, self.topk, self.group)
            if learning:
                self.step_thresholds += torch.stack([tau, torch.ones_like(tau)])
        else:
            tau = self.threshold_ema[0]
        routing_map_TE = scores_TE.detach() >= tau
        probs_TE = scores_TE * routing_map_TE
        stats = {}
        if learning and self.similarity_loss_coeff > 0:
            share, sim_loss = router_similarity_loss(
                logits_TE, routing_map_TE, self.group, self.similarity_divisor,
                self.similarity_off_diagonal)
            N = logits_TE.shape[0] * group_size(self.group)
            probs_TE = MoEAuxLossAutoScaler.apply(probs_TE,
                                                  self.similarity_loss_coeff * share * N)
            stats["similarity_loss"] = sim_loss.item()
        stats.update(expert_choice_stats(logits_TE.detach().softmax(dim=-1), routing_map_TE,
                                         self.topk))
        stats["threshold"] = float(tau)
        stats["threshold_ema"] = self.threshold_ema.item()
        return probs_TE, routing_map_TE, stats

    def plr_features(self, input: torch.Tensor) -> torch.Tensor:
        """h [T, D] = GELU(x W_hᵀ): the PLR head's hidden features (the gate reads them)."""
        return F.gelu(F.linear(input.reshape(-1, input.shape[-1]).float(), self.plr_hidden))

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        if self.plr_coeff <= 0:
            return super().gating(input)
        return F.linear(self.plr_features(input), self.weight)

    def forward(self, input: torch.Tensor, padding_mask=None):
        return self.routing(self.gating(input))

    def plr_loss_sum(self, context: Context, h_TD: torch.Tensor) -> torch.Tensor:
        """Σ over this rank's tokens of CE(target head(h_t), next token_t)."""
        context.require("labels_BS", "model.moe.race.plr_coeff (PLR head)")
        labels_T = context.tokens("labels_BS", self.sp_rank, self.sp_size).to(h_TD.device)
        logits_TV = F.linear(h_TD, self.plr_target)
        return F.cross_entropy(logits_TV, labels_T.long(), reduction="sum")

    def plr_regression_share(self, context: Context, h_TD: torch.Tensor,
                             tokens_per_sample: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's share of Σ_images L_PLR, with gradient; Σ (ŷ − y)² of its tokens,
        detached): Σ over its tokens of (W_y·h_t − y_t)² / (S·P), S = `tokens_per_sample` the
        image's whole token count, P = p²·C (module docstring)."""
        context.require("targets_BSP", "model.moe.race.plr_coeff (PLR head)")
        y_TP = context.tokens("targets_BSP", self.sp_rank, self.sp_size).to(h_TD.device)
        err_sum = ((F.linear(h_TD, self.plr_target) - y_TP.float()) ** 2).sum()
        return err_sum / (tokens_per_sample * y_TP.shape[-1]), err_sum.detach()

    def route(self, hidden_SBD: torch.Tensor, context: Context) -> RouterOutput:
        if self.plr_coeff > 0:
            h_TD = self.plr_features(hidden_SBD)
            logits_TE = F.linear(h_TD, self.weight)
        else:
            logits_TE = super().gating(hidden_SBD)
        probs_TE, routing_map_TE, stats = self.routing_with_stats(logits_TE)
        if self.plr_coeff > 0 and self.training and torch.is_grad_enabled():
            if self.plr_regression_size:      # a diffusion target: per-image MSE
                share, err_sum = self.plr_regression_share(
                    context, h_TD, hidden_SBD.shape[0] * self.sp_size)
                probs_TE = MoEAuxLossAutoScaler.apply(probs_TE, self.plr_coeff * share)
                stats["plr_loss"] = err_sum.item() / max(1, h_TD.shape[0]
                                                         * self.plr_regression_size)
            else:
                ce_sum = self.plr_loss_sum(context, h_TD)
                probs_TE = MoEAuxLossAutoScaler.apply(probs_TE, self.plr_coeff * ce_sum)
                stats["plr_loss"] = ce_sum.item() / max(1, h_TD.shape[0])
        return RouterOutput(probs_TE=probs_TE, routing_map_TE=routing_map_TE,
                            tokens_per_expert_E=routing_map_TE.sum(dim=0).detach(), stats=stats)

    @torch.no_grad()
    def after_step(self) -> None:
        """τ_ema ← m·τ_ema + (1−m)·τ̄ with τ̄ the step's mean threshold. Over the data-parallel
        group τ is the same on every rank that has this layer: no reduction needed; per
        micro-batch the (Σ τ, count) of every rank are summed (TP and CP copies add to both)."""
        sums = self.step_thresholds.clone()
        if self.average_over_dp and dist.is_initialized():
            dist.all_reduce(sums, group=self.tp_dp_cp_group)
        total, count = sums.tolist()
        if count == 0:
            return
        mean_tau = total / count
        m = self.ema_momentum if self.threshold_updates.item() > 0 else 0.0
        self.threshold_ema.mul_(m).add_((1 - m) * mean_tau)
        self.threshold_updates += 1
        self.step_thresholds.zero_()
