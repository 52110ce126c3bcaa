"""DiffMoE (Shi, Yuan, Yang, Wang et al., "DiffMoE: Dynamic Token Selection for Scalable
Diffusion Transformers", arXiv 2503.14487, §3; papers.md §8b; reference code KwaiVGI/DiffMoE
`models/models_DiffMoE.py` `SparseMoEBlock`): experts choose tokens from a batch-level global
token pool, and a capacity predictor sets how many each expert takes at inference.

Training (the pool is the rank's flattened micro-batch, N = S·B tokens; under sequence
parallelism the TP ranks' shards together, thresholds found by `token_groups.kth_largest`):
    s = softmax(x·W_gᵀ)                    scores over experts, per token
    k = ⌊C·N/E⌋ (at least 1)               C = model.moe.topk, the code's `capacity` (1)
    M_te = 1[s_te ≥ k-th largest of s_·e]   each expert takes its top-k tokens of the pool
    y_t = Σ_e M_te·s_te·FFN_e(x_t)          weights: the raw scores (the code's `gating`)
Capacity predictor: p = W₂·SiLU(W₁·sg(x) + b₁) + b₂ ∈ R^E per token (sg: stop-gradient, as
the code's `x.detach()`), trained with BCEWithLogits(p, M), the mean over the pool's N·E
entries, weight `predictor_loss_coeff` (the code's `CapacityPred_loss_weight`). The reference
adds it to a loss that is a mean over images, so a micro-batch attaches coeff·BCE·B (its B
samples): in a family whose loss unit is the sample (vit, dit) Megatron's division by the
global sample count gives exactly the reference's weighting; in the lm family (unit: token) the
weight per token is coeff/S.

Thresholds (model state, `expert_threshold`, checkpointed): q_e = the k-th largest σ(p_·e) of
the pool (the same k), and once per optimizer step
    τ_e ← m·τ_e + (1−m)·q̄_e,   q̄_e = mean of q_e over the step's micro-batches and DP ranks
(`after_step`; the all-reduce over the data-parallel group is the code's all-reduce over its
DDP world). τ starts at 0 and m = `ema_momentum` = 0.95, as the code. The code updates τ on
every forward; with one micro-batch per step (the code has no gradient accumulation) that is
the same rule.

Inference (`inference`):
- threshold (default): M_te = 1[σ(p_te) > τ_e], so k_e = #{t : σ(p_te) > τ_e} and each token's
  experts depend on that token alone: batch-independent (one image alone routes as inside a
  batch) and causal: the inference rule issue 15 asks for (the paper's text was not retrieved
  here; papers.md §8b describes the code).
- pool_topk: the code's `forward_eval`: k_e = #{t : σ(p_te) > τ_e} over the pool, and expert e
  takes its top-k_e tokens *by gate score* s. The counts are the same, but which tokens get
  them depends on the other samples: batch-dependent.
In evaluation the router accumulates the active compute (`active_compute`: tokens routed per
expert / tokens, and experts per token relative to the training capacity C).

Deviations: the gate W_g is initialised as every megamoe router (normal, model.init_method_std;
the code draws N(0, 0.006)); the predictor's linears as every megamoe linear (normal, zero bias;
the code's DiT applies xavier-uniform); the optional capacity schedule (C from E down to C
over stages I–II) is not implemented. Not causal in training (later tokens and other samples
move the pool's thresholds): refused in the causal decoder without model.moe.allow_non_causal.

Shapes: T tokens of this rank (S·B, Megatron order), N tokens of the pool, E experts, D hidden.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import Router

from megamoe.blocks.context import Context
from megamoe.config.moe_families import DIFFMOE_INFERENCE_RULES
from megamoe.moe.routers.base import MegamoeRouter, RouterOutput
from megamoe.moe.routers.expert_choice import expert_choice, expert_choice_stats
from megamoe.moe.routers.token_groups import all_reduce_sum, kth_largest, selection_group


def pool_capacity(num_tokens: int, num_experts: int, capacity: int) -> int:
    """k = ⌊C·N/E⌋ tokens per expert (the code's int(S/E·C)), between 1 and N."""
    return max(1, min(num_tokens, capacity * num_tokens // num_experts))


def predictor_quantiles(predicted_TE: torch.Tensor, k: int, group=None) -> torch.Tensor:
    """[E]: q_e, the k-th largest σ(p_te) of each expert's column over the pool."""
    return kth_largest(torch.sigmoid(predicted_TE.detach().float()), k, group)


def threshold_routing(predicted_TE: torch.Tensor, threshold_E: torch.Tensor) -> torch.Tensor:
    """Routing map of the per-token inference rule: σ(p_te) > τ_e."""
    return torch.sigmoid(predicted_TE.detach().float()) > threshold_E


def pool_topk_routing(scores_TE: torch.Tensor, predicted_TE: torch.Tensor,
                      threshold_E: torch.Tensor, group=None) -> torch.Tensor:
    """Routing map of the code's inference rule: k_e tokens pass τ_e over the pool, and expert
    e takes the k_e tokens of largest gate score s_·e (none when k_e = 0)."""
    k_E = all_reduce_sum(threshold_routing(predicted_TE, threshold_E).sum(0), group)
    cut_E = kth_largest(scores_TE.detach(), k_E.clamp_min(1), group)
    return (scores_TE.detach() >= cut_E) & (k_E > 0)


class DiffMoEPoolRouter(Router, MegamoeRouter):
    paper = ("DiffMoE (Shi et al. 2025) §3: expert choice over the batch-level token pool, "
             "capacity predictor with per-expert EMA thresholds for dynamic inference")
    causal = False
    selection_groups = ("micro-batch",)

    @classmethod
    def extra_parameters(cls, moe_cfg, hidden: int, vocab_size: int) -> tuple[int, int]:
        """The capacity predictor, Linear(D, D) → SiLU → Linear(D, E), run on every token."""
        E = moe_cfg.num_experts
        n = hidden * hidden + hidden + E * hidden + E
        return n, n

    def __init__(self, config, pg_collection=None, *, predictor_loss_coeff: float = 1.0,
                 ema_momentum: float = 0.95, inference: str = "threshold"):
        super().__init__(config=config, pg_collection=pg_collection)
        assert inference in DIFFMOE_INFERENCE_RULES, inference
        D, E = config.hidden_size, config.num_moe_experts
        self.capacity = config.moe_router_topk                  # C
        self.predictor_loss_coeff = predictor_loss_coeff
        self.ema_momentum = ema_momentum
        self.inference = inference
        self.pool = selection_group("micro-batch", pg_collection, config.sequence_parallel)
        self.group = self.pool.group
        self.capacity_predictor = torch.nn.Sequential(
            torch.nn.Linear(D, D, dtype=config.params_dtype), torch.nn.SiLU(),
            torch.nn.Linear(D, E, dtype=config.params_dtype))
        for p in self.capacity_predictor.parameters():
            if config.perform_initialization:
                (config.init_method(p) if p.dim() == 2 else torch.nn.init.zeros_(p))
            setattr(p, "sequence_parallel", config.sequence_parallel)   # replicated over TP
        # model state: τ_e
        self.register_buffer("expert_threshold", torch.zeros(E, dtype=torch.float32))
        # Σ q_e and the micro-batch count of the current step; Σ k_e and tokens in evaluation
        self.register_buffer("step_quantiles", torch.zeros(E + 1, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("eval_routed", torch.zeros(E + 1, dtype=torch.float64),
                             persistent=False)

    @classmethod
    def options_from(cls, moe_cfg) -> dict:
        o = moe_cfg.diffmoe
        return {"predictor_loss_coeff": o.predictor_loss_coeff,
                "ema_momentum": o.ema_momentum, "inference": o.inference}

    def forward(self, input: torch.Tensor, padding_mask=None):
        out = self.route(input, Context())
        return out.probs_TE, out.routing_map_TE

    def routing(self, logits: torch.Tensor, padding_mask=None):
        raise NotImplementedError("DiffMoE routes from the hidden states (route)")

    def route(self, hidden_SBD: torch.Tensor, context: Context) -> RouterOutput:
        S, B, D = hidden_SBD.shape
        logits_TE = self.gating(hidden_SBD).view(-1, self.num_experts)
        scores_TE = torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
        predicted_TE = self.capacity_predictor(hidden_SBD.detach().reshape(-1, D)).float()
        if self.training:
            probs_TE, routing_map_TE, stats = self._train_routing(scores_TE, predicted_TE, B)
        else:
            probs_TE, routing_map_TE, stats = self._eval_routing(scores_TE, predicted_TE)
        return RouterOutput(probs_TE=probs_TE, routing_map_TE=routing_map_TE,
                            tokens_per_expert_E=routing_map_TE.sum(dim=0).detach(), stats=stats)

    def _train_routing(self, scores_TE, predicted_TE, batch: int):
        """Expert choice over the pool; the predictor's BCE and the step's quantiles."""
        T = scores_TE.shape[0]
        N = T * (1 if self.group is None else self.group.size())
        k = pool_capacity(N, self.num_experts, self.capacity)
        probs_TE, routing_map_TE = expert_choice(scores_TE, k, self.pool)
        stats = expert_choice_stats(scores_TE, routing_map_TE, self.capacity)
        stats["capacity"] = float(k)
        if torch.is_grad_enabled():        # the pass that builds the graph (not a recompute's)
            q_E = predictor_quantiles(predicted_TE, k, self.group)
            self.step_quantiles += torch.cat([q_E, q_E.new_ones(1)])
            bce_sum = F.binary_cross_entropy_with_logits(
                predicted_TE, routing_map_TE.float(), reduction="sum")
            share = self.predictor_loss_coeff * bce_sum / (N * self.num_experts)
            # the pool's B samples weight its mean BCE (see the module docstring)
            probs_TE = MoEAuxLossAutoScaler.apply(probs_TE, share * batch)
            stats["predictor_loss"] = bce_sum.item() / predicted_TE.numel()
        passing_TE = threshold_routing(predicted_TE, self.expert_threshold)
        stats["predicted_experts_per_token"] = passing_TE.sum().item() / T
        stats["threshold_mean"] = self.expert_threshold.mean().item()
        return probs_TE, routing_map_TE, stats

    def _eval_routing(self, scores_TE, predicted_TE):
        """The inference rule against τ; accumulates the active compute."""
        if self.inference == "threshold":
            routing_map_TE = threshold_routing(predicted_TE, self.expert_threshold)
        else:
            routing_map_TE = pool_topk_routing(scores_TE, predicted_TE, self.expert_threshold,
                                               self.group)
        with torch.no_grad():
            self.eval_routed += torch.cat([routing_map_TE.sum(0).double(),
                                           routing_map_TE.new_full((1,), routing_map_TE.shape[0],
                                                                   dtype=torch.float64)])
        stats = expert_choice_stats(scores_TE, routing_map_TE, self.capacity)
        return scores_TE * routing_map_TE, routing_map_TE, stats

    def active_compute(self, reset: bool = True) -> dict | None:
        """Evaluation's routed tokens per expert / tokens (`per_expert`), their sum (experts per
        token) and that relative to the training capacity C, since the last reset; None when
        nothing was evaluated. Counts are this rank's tokens (a sequence shard under SP)."""
        routed_E, tokens = self.eval_routed[:-1], self.eval_routed[-1].item()
        if reset:
            routed_E = routed_E.clone()
            self.eval_routed.zero_()
        if tokens == 0:
            return None
        per_expert = (routed_E / tokens).tolist()
        return {"per_expert": per_expert, "experts_per_token": sum(per_expert),
                "relative_to_training": sum(per_expert) / self.capacity}

    @torch.no_grad()
    def after_step(self) -> None:
        """τ_e ← m·τ_e + (1−m)·q̄_e over the step's micro-batches of every data-parallel rank
        (TP copies add the same quantiles to both sums)."""
        sums = self.step_quantiles.clone()
        group = self.tp_dp_cp_group
        if group is not None and dist.is_initialized() and group.size() > 1:
            dist.all_reduce(sums, group=group)
        count = sums[-1].item()
        if count == 0:
            return
        m = self.ema_momentum
        self.expert_threshold.mul_(m).add_((1 - m) * sums[:-1] / count)
        self.step_quantiles.zero_()

