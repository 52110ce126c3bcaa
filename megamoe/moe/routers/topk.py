"""Token-choice top-k routing (Shazeer et al. 2017; Switch, Fedus et al. 2021, Eq. 4-5;
ST-MoE z-loss, Zoph et al. 2022, Eq. 5; DeepSeek auxiliary-loss-free balancing, Wang et al.
2024, Eq. 3-4), through Megatron-Core's `TopKRouter`.

Variants (`model.moe.*`): softmax or sigmoid scores; `renormalize` the k selected weights to sum
to 1 or keep the raw scores (for softmax, top-k of the logits followed by a softmax over them —
"post-softmax top-k", Mixtral — equals pre-softmax top-k with renormalisation, so one switch
covers both); Switch load-balancing loss over the micro-batch (`aux_loss_type: switch`), per
sequence (`sequence`) or over the global batch (`global`); z-loss; capacity with drops by
probability or position. `loss_free_bias_rate` > 0 adds DeepSeek's selection bias for softmax
*and* sigmoid scores (Megatron-Core 0.16's covers sigmoid only): selection uses s + b, the
combine weights use s, and after each optimizer step b_e ← b_e + u·sign(mean(c) − c_e) with c the
tokens per expert counted over the step (all micro-batches and ranks). The bias is model state.

The global-batch variant (Megatron's `global_aux_loss`) weights each micro-batch's scores by the
expert counts of the global batch seen so far (summed over DP ranks, averaged over the step's
micro-batches until then), so its value depends on how the batch is split over DP ranks; it
matches one process under TP+SP, and under DP it is Megatron's definition.

Megatron supplies the gating linear, the aux-loss functions, capacity dropping and the loss
attachment; megamoe scores and selects (for the renormalisation switch and the softmax bias).

Scale under sequence parallelism with per-token loss (Megatron-Core 0.16): each TP rank holds a
partial aux / z-loss over its slice of the micro-batch, but Megatron weights it by the rank's
*local* token count (and divides the z-loss coefficient by the TP size), so the auxiliary
gradients come out TP times too small compared with one process. The parity test
`tests/distributed/test_parity.py` (TP2+SP) shows it; the overrides below weight the partial
losses by the micro-batch's token count instead.

Padding (`route(..., padding_mask)`, bool [S, B], True = pad; the recursion block of
megamoe.mor hands its compact batches' pads here): pads get an all-False routing-map row and
weight 0, so the dispatchers never send them (as for tokens dropped over capacity) and their MoE
output is 0; the z-loss, the balancing losses (T, f_e, P_e over real tokens; Megatron's masked
variants are not used: they divide by 0 on an all-pad micro-batch, take one T for every
sequence of the sequence-wise loss, and their per-token scale assumes equal TP shards),
capacity, the loss-free counts and the statistics see only real tokens. Real tokens' outputs,
losses and gradients are those of the same tokens without the pads.

Shapes: T tokens of this rank (S·B, Megatron order), E experts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    apply_router_token_dropping,
    save_to_aux_losses_tracker,
    z_loss_func,
)
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.moe.router import TopKRouter

from megamoe.blocks.context import Context
from megamoe.moe.routers.base import MegamoeRouter, RouterOutput, routing_stats


def scores_for(logits_TE: torch.Tensor, score_function: str) -> torch.Tensor:
    if score_function == "softmax":
        return torch.softmax(logits_TE, dim=-1, dtype=torch.float32)
    return torch.sigmoid(logits_TE.float())


def select_topk(scores_TE: torch.Tensor, k: int, renormalize: bool,
                bias_E: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(combine weights [T, E], routing map [T, E]): the k experts of largest s (+ b) per token,
    weighted by their unbiased scores, renormalised to sum 1 if asked and k > 1 (a single weight
    of 1 would give the router no gradient; Switch top-1 keeps p)."""
    chooser_TE = scores_TE if bias_E is None else scores_TE.detach() + bias_E
    top_Tk = torch.topk(chooser_TE, k, dim=-1).indices
    weights_Tk = scores_TE.gather(1, top_Tk)
    if renormalize and k > 1:
        weights_Tk = weights_Tk / (weights_Tk.sum(dim=-1, keepdim=True) + 1e-20)
    probs_TE = torch.zeros_like(scores_TE).scatter(1, top_Tk, weights_Tk)
    routing_map_TE = torch.zeros_like(scores_TE, dtype=torch.bool).scatter(1, top_Tk, True)
    return probs_TE, routing_map_TE


def loss_free_update(bias_E: torch.Tensor, counts_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek's sign rule: raise the bias of under-loaded experts, lower over-loaded ones."""
    return bias_E + rate * torch.sign(counts_E.mean() - counts_E)


class TopKSoftmaxRouter(TopKRouter, MegamoeRouter):
    paper = ("Switch Transformer (Fedus et al. 2021) Eq. 4-5; ST-MoE z-loss (Zoph et al. 2022) "
             "Eq. 5; DeepSeek loss-free balancing (Wang et al. 2024) Eq. 3-4")
    # capacity dropping competes over the rank's tokens (Megatron sizes it from them): the
    # micro-batch, or its sequence shard under sequence parallelism
    selection_groups = ("token", "micro-batch")
    takes_padding_mask = True

    def __init__(self, config, pg_collection=None, *, renormalize: bool = True,
                 loss_free_bias_rate: float = 0.0):
        super().__init__(config=config, pg_collection=pg_collection)
        self.renormalize = renormalize
        self.loss_free_bias_rate = loss_free_bias_rate
        E = config.num_moe_experts
        if loss_free_bias_rate > 0:
            # model state (checkpointed); the counts of the current step are not
            self.register_buffer("selection_bias", torch.zeros(E, dtype=torch.float32))
            self.register_buffer("step_tokens_per_expert", torch.zeros(E, dtype=torch.float32),
                                 persistent=False)
        else:
            self.selection_bias = None

    def is_causal(self) -> bool:
        return self.config.moe_expert_capacity_factor is None

    @classmethod
    def causal_for(cls, moe_cfg) -> bool:
        return moe_cfg.capacity_factor is None

    @classmethod
    def selection_group_for(cls, moe_cfg) -> str:
        return "token" if moe_cfg.capacity_factor is None else "micro-batch"

    @classmethod
    def options_from(cls, moe_cfg) -> dict:
        return {"renormalize": moe_cfg.renormalize,
                "loss_free_bias_rate": moe_cfg.loss_free_bias_rate}

    # -- Megatron scale fixes under SP + per-token loss (see the module docstring) --------------

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss,
                                           aux_loss_name, reduce_group,
                                           reduce_group_has_dp=False, valid_token_count=None):
        if (self.calculate_per_token_loss and valid_token_count is not None
                and reduce_group in (self.tp_cp_group, self.tp_dp_cp_group)):
            valid_token_count = valid_token_count * self.tp_cp_group.size()
        return super().attach_and_log_load_balancing_loss(
            activation, aux_loss_coeff, aux_loss, self.tracker_name(aux_loss_name), reduce_group,
            reduce_group_has_dp=reduce_group_has_dp, valid_token_count=valid_token_count)

    def apply_z_loss(self, logits, padding_mask=None):
        coeff = self.config.moe_z_loss_coeff
        if coeff is None or not (self.training and torch.is_grad_enabled()):
            return logits
        if not self.calculate_per_token_loss:
            return super().apply_z_loss(logits, padding_mask)
        # Σ_local z² · c: summed over the TP ranks this is the micro-batch's mean z² · c · N.
        z_loss = z_loss_func(logits, coeff, padding_mask=padding_mask)
        num_tokens = (~padding_mask).sum() if padding_mask is not None else logits.shape[0]
        logits = MoEAuxLossAutoScaler.apply(logits, z_loss * num_tokens)
        save_to_aux_losses_tracker(self.tracker_name("z_loss"), z_loss / coeff, self.layer_number,
                                   self.config.num_layers)
        return logits

    # -- routing ---------------------------------------------------------------------------------

    def logits(self, hidden_SBD: torch.Tensor) -> torch.Tensor:
        """[S, B, E]: Megatron's `TopKRouter.forward` up to the routing."""
        self._maintain_float32_expert_bias()
        return self.gating(self.apply_input_jitter(hidden_SBD))

    def routing(self, logits, padding_mask=None):
        """Megatron's `TopKRouter.routing` interface (see `routing_with_scores`)."""
        return self.routing_with_scores(logits, padding_mask)[:2]

    def routing_with_scores(self, logits, padding_mask=None):
        """(combine weights [T, E], routing map [T, E], detached scores [T, E]): Megatron's
        `TopKRouter.routing` with megamoe's selection (renormalisation switch, loss-free bias
        for either score function). `padding_mask` (bool [S, B], True = pad): pads go to no
        expert and count in no loss or statistic (see `route`)."""
        seq_length, bsz = logits.shape[:2]
        pad_T = None if padding_mask is None else padding_mask.reshape(-1)
        logits_TE = self.apply_z_loss(logits.view(-1, self.config.num_moe_experts), pad_T)
        scores_TE = scores_for(logits_TE, self.score_function)
        probs_TE, routing_map_TE = select_topk(scores_TE, self.topk, self.renormalize,
                                               self.selection_bias)
        if pad_T is not None:
            keep_T1 = ~pad_T[:, None]
            probs_TE, routing_map_TE = probs_TE * keep_T1, routing_map_TE & keep_T1
        if self.config.moe_expert_capacity_factor is not None:
            probs_TE, routing_map_TE = self._drop_over_capacity(probs_TE, routing_map_TE, pad_T)
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_enabled():
            aux_scores_TE = scores_TE
            if self.score_function == "sigmoid":       # Megatron's aux losses take normalised s
                aux_scores_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
            chosen_TE = select_topk(aux_scores_TE.detach(), self.topk, False)[1]
            if pad_T is None:
                probs_TE = self._apply_aux_loss(probs_TE, aux_scores_TE, chosen_TE)
                probs_TE = self._apply_seq_aux_loss(probs_TE, aux_scores_TE, chosen_TE,
                                                    seq_length, bsz)
                probs_TE = self._apply_global_aux_loss(probs_TE, aux_scores_TE, chosen_TE)
            else:
                probs_TE = self._apply_masked_aux_losses(probs_TE, aux_scores_TE, chosen_TE,
                                                         ~pad_T, seq_length, bsz)
        if self.selection_bias is not None and self.training and torch.is_grad_enabled():
            self.step_tokens_per_expert += routing_map_TE.sum(dim=0)
        return probs_TE, routing_map_TE, scores_TE.detach()

    def _drop_over_capacity(self, probs_TE, routing_map_TE, pad_T):
        """Megatron's capacity dropping; with pads, over the real tokens only (the capacity
        ⌈T·cf/E⌉ counts real tokens, as without the pads)."""
        def drop(p_TE, m_TE):
            return apply_router_token_dropping(
                p_TE, m_TE, router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity)
        if pad_T is None:
            return drop(probs_TE, routing_map_TE)
        real_T = ~pad_T
        if not bool(real_T.any()):
            return probs_TE, routing_map_TE                 # all pads: nothing is routed
        p_RE, m_RE = drop(probs_TE[real_T], routing_map_TE[real_T])
        return (torch.zeros_like(probs_TE).index_put((real_T,), p_RE),
                torch.zeros_like(routing_map_TE).index_put((real_T,), m_RE))

    # -- balancing losses with pads --------------------------------------------------------------

    def _apply_masked_aux_losses(self, probs_TE, scores_TE, chosen_TE, real_T, S, B):
        """Switch / sequence / global balancing losses over the real tokens only: T in
        f_e = Σ_t c_te / (k·T) and P_e = Σ_t p_te / T counts real tokens (per sequence for the
        sequence-wise loss, T_b), so that pads change nothing. Counts are summed over the ranks
        holding the micro-batch (TP·CP; TP·DP·CP for the global batch) as Megatron does."""
        E = self.config.num_moe_experts
        real_T1 = real_T[:, None]
        scores_TE, chosen_TE = scores_TE * real_T1, (chosen_TE & real_T1).float()
        # micro-batch counts: c_e, c_be (per sequence), T, T_b
        local = torch.cat([chosen_TE.sum(0), chosen_TE.view(S, B * E).sum(0),
                           real_T.float().sum()[None], real_T.float().view(S, B).sum(0)])
        counts = reduce_from_tensor_model_parallel_region(local, self.tp_cp_group)
        c_E, c_BE, n, n_B = counts.split([E, B * E, 1, B])
        n_mb = n.squeeze(0)                         # real tokens of the micro-batch
        coeff = self.get_aux_loss_coeff("aux_loss")
        if coeff > 0:
            aux = self._balance(scores_TE.sum(0), c_E, n_mb, coeff)
            probs_TE = self._attach(probs_TE, coeff, aux, "load_balancing_loss",
                                    self.tp_cp_group, n_mb)
        coeff = self.get_aux_loss_coeff("seq_aux_loss")
        if coeff > 0:
            aux = self._balance(scores_TE.view(S, B, E).sum(0), c_BE.view(B, E), n_B,
                                coeff).sum() / B
            # Megatron scales this loss by the tokens per sequence, S (not S·B): kept as is
            probs_TE = self._attach(probs_TE, coeff, aux, "seq_load_balancing_loss",
                                    self.tp_cp_group, n_mb / B)
        coeff = self.get_aux_loss_coeff("global_aux_loss")
        if coeff > 0:
            glob = reduce_from_tensor_model_parallel_region(
                torch.cat([chosen_TE.sum(0), real_T.float().sum()[None]]), self.tp_dp_cp_group)
            self.global_tokens_per_expert += glob[:E]
            self.ga_steps += 1
            aux = self._balance(scores_TE.sum(0), self.global_tokens_per_expert / self.ga_steps,
                                glob[E], coeff)
            probs_TE = self._attach(probs_TE, coeff, aux, "global_load_balancing_loss",
                                    self.tp_dp_cp_group, n_mb, has_dp=True)
        return probs_TE

    def _balance(self, P_xE, c_xE, n_x, coeff):
        """This rank's share of E·coeff/(k·T²) · Σ_e P_e c_e (Switch Eq. 4 with f and P as sums
        over T real tokens), per leading index x (none, or per sequence); 0 when the group holds
        no real token."""
        k, E = self.topk, self.config.num_moe_experts
        return (P_xE * c_xE).sum(-1) * (E * coeff / k) / n_x.clamp_min(1.0) ** 2

    def _attach(self, probs_TE, coeff, aux, name, group, n_mb, has_dp=False):
        """Megatron's attachment, scaled by the micro-batch's real-token count n_mb (already
        summed over TP·CP: not the local count that the override above multiplies by TP)."""
        return TopKRouter.attach_and_log_load_balancing_loss(
            self, probs_TE, coeff, aux, self.tracker_name(name), group, reduce_group_has_dp=has_dp,
            valid_token_count=n_mb)

    def route(self, hidden_SBD: torch.Tensor, context: Context,
              padding_mask: torch.Tensor | None = None) -> RouterOutput:
        """`padding_mask`: bool [S, B] (this rank's tokens), True = pad. Pads are routed to no
        expert (zero routing-map row, weight 0: the dispatchers skip them as they skip tokens
        dropped over capacity; their MoE output is 0) and are left out of the z-loss, the
        balancing losses, capacity, the loss-free counts and the statistics."""
        probs_TE, routing_map_TE, scores_TE = self.routing_with_scores(self.logits(hidden_SBD),
                                                                       padding_mask)
        real_T = None if padding_mask is None else ~padding_mask.reshape(-1)
        scores_TE = scores_TE if real_T is None else scores_TE[real_T]
        stats = routing_stats(scores_TE, routing_map_TE if real_T is None
                              else routing_map_TE[real_T], self.topk)
        return RouterOutput(probs_TE=probs_TE, routing_map_TE=routing_map_TE,
                            tokens_per_expert_E=routing_map_TE.sum(dim=0).detach(), stats=stats)

    @torch.no_grad()
    def after_step(self) -> None:
        """End of an optimizer step: update the loss-free bias from the step's counts (summed
        over every rank that routes tokens of this step), reset the global-batch aux counts."""
        self.reset_global_aux_loss_tracker()
        if self.selection_bias is None:
            return
        counts_E = self.step_tokens_per_expert.clone()
        if dist.is_initialized():
            dist.all_reduce(counts_E, group=self.tp_dp_cp_group)
        self.selection_bias.copy_(loss_free_update(self.selection_bias, counts_E,
                                                   self.loss_free_bias_rate))
        self.step_tokens_per_expert.zero_()
