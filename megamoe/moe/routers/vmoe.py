"""V-MoE routing (Riquelme et al., "Scaling Vision with Sparse Mixture of Experts", arXiv
2106.05974: Eq. 1-2 noisy top-k gating, §4 Batch Prioritized Routing, App. A importance/load
losses; papers.md §4), written after `google-research/vmoe` `vmoe/nn/routing.py`
(`NoisyTopExpertsPerItemRouter`).

- Gating: g = softmax(xW + ε), ε ~ N(0, σ²), σ = noise_std / E, noise in training only; the k
  largest g are the combine weights, *not* renormalised.
- Capacity per expert: ceil(N·k·C / E) rounded up to a multiple of `capacity_multiple_of`, N the
  tokens of the selection group (the micro-batch), C = `capacity_ratio` (`eval_capacity_ratio`
  in eval mode; None: dropless). Buffer slots are filled in (choice, token) order: every token's
  top-1 choice before any token's top-2 choice; overflow is dropped (residual only). Within a
  choice the tokens go in the reference's batch order (`token_groups.batch_order`: image by
  image, position by position within an image), not Megatron's position-major [S, B] order.
- Batch Prioritized Routing (`priority`): tokens are ranked by max_e g (`max`) or by the sum of
  their top-k g (`sum`) before the slots are filled, ties in batch order (the reference's
  stable argsort); `none` keeps batch order.
- Auxiliary losses per micro-batch: importance L_imp = CV²(Σ_x softmax(xW)) on the clean logits;
  load L_load = CV²(mean_x p), p_{x,e} = 1 − Φ((η_x − (xW)_e)/σ), η_x the k-th largest noisy
  logit of x (training with noise only). Total = c_imp·L_imp + c_load·L_load (0.005 each).

The noise must be the same in a parallel run and in its single-process reference, which sees
the same micro-batches but on other ranks and in another order, and the same when activation
recompute runs a forward again. It is therefore drawn per sample from a generator seeded with
(noise_seed, optimizer step, layer, global sample index), plus the layer's stream for an
encoder's layers (megamoe.moe.layer: a vlm encoder's layer N and its LM's layer N must not
draw the same noise for a sample): the sample index is the one the data
loader stamps on every sample (`Context.sample_index_B`, its global dataset position), the step
is the persistent `noise_step` buffer (model state: resumed runs continue the sequence; it
equals the number of optimizer steps taken). Under sequence parallelism each rank keeps its
rows of the sample's [S, E] draw.

Capacity and BPR choose across the micro-batch: non-causal in a decoder unless dropless. Under
TP + SP the selection runs on the gathered (detached) gates (`token_groups.SequenceShards`); the losses use
all-reduced partial sums, so they equal the reference's.

Shapes: S sequence (this rank's shard), B micro-batch, T = S·B tokens of this rank, N tokens of
the micro-batch, E experts, k experts per token.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.moe.router import TopKRouter

from megamoe.blocks.context import Context
from megamoe.moe.routers.base import MegamoeRouter, RouterOutput, routing_stats
from megamoe.moe.routers.token_groups import SequenceShards, batch_order, selection_group

PRIORITIES = ("none", "max", "sum")


def vmoe_capacity(num_tokens: int, k: int, capacity_ratio: float, num_experts: int,
                  multiple_of: int = 4) -> int:
    """Slots per expert: ceil(N·k·C/E), rounded up to a multiple of `multiple_of`."""
    capacity = math.ceil(num_tokens * k * capacity_ratio / num_experts)
    if multiple_of > 1 and capacity % multiple_of:
        capacity += multiple_of - capacity % multiple_of
    return capacity


@torch.no_grad()
def assign_buffers(gates_NE: torch.Tensor, k: int, capacity: int, priority: str = "none",
                   batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts [N, k], kept [N, k]) for the N = S·B tokens of a group in Megatron's order
    (`batch` = B): each token's k largest gates; slots are filled choice by choice (all top-1
    choices, then all top-2 …), within a choice in batch order (sample by sample, position by
    position) or by descending priority, ties in batch order."""
    top = torch.topk(gates_NE, k, dim=-1)
    experts_Nk = top.indices
    N, E = gates_NE.shape
    order_N = batch_order(N, batch, gates_NE.device)
    if priority != "none":
        score_N = top.values[:, 0] if priority == "max" else top.values.sum(dim=-1)
        order_N = order_N[torch.argsort(score_N[order_N], descending=True, stable=True)]
    onehot_kNE = F.one_hot(experts_Nk[order_N].t(), E)
    slot_kNE = onehot_kNE.reshape(k * N, E).cumsum(dim=0).reshape(k, N, E)
    position_kN = (slot_kNE * onehot_kNE).sum(dim=-1) - 1
    kept_Nk = torch.empty_like(experts_Nk, dtype=torch.bool)
    kept_Nk[order_N] = (position_kN < capacity).t()
    return experts_Nk, kept_Nk


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """(std/mean)², population std (as jnp.std)."""
    return x_E.var(unbiased=False) / x_E.mean().pow(2).clamp_min(1e-20)


def load_probabilities(logits_TE: torch.Tensor, noisy_TE: torch.Tensor, k: int,
                       sigma: float) -> torch.Tensor:
    """p_{x,e} = P(expert e stays in x's top-k under fresh noise) = 1 − Φ((η_x − l_{x,e})/σ)."""
    eta_T1 = torch.topk(noisy_TE, k, dim=-1).values[:, -1:]
    return torch.special.ndtr((logits_TE - eta_T1) / sigma)


def noise_seed(*keys: int) -> int:
    """A 63-bit seed that mixes integer keys (splitmix64 finaliser), the same in every process."""
    h = 0x9E3779B97F4A7C15
    for key in keys:
        h = (h ^ (key & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    return h >> 1


def sample_noise(keys: tuple, samples: list[int], S: int, E: int, sp_rank: int = 0,
                 sp_size: int = 1) -> torch.Tensor:
    """[S·B, E] standard normal draws for the B global sample indices `samples`, rows of
    sequence shard `sp_rank` of `sp_size` (each S long), in Megatron's [S, B] order. Sample i
    draws its whole [S·sp_size, E] block from a generator seeded with (*keys, i)."""
    rows = slice(sp_rank * S, (sp_rank + 1) * S)
    draws = [torch.Generator().manual_seed(noise_seed(*keys, int(i))) for i in samples]
    eps_SBE = torch.stack([torch.randn(S * sp_size, E, generator=g)[rows] for g in draws], dim=1)
    return eps_SBE.reshape(S * len(samples), E)


def token_noise(keys: tuple, first_sample: int, B: int, S: int, E: int, sp_rank: int = 0,
                sp_size: int = 1) -> torch.Tensor:
    """`sample_noise` of the B consecutive samples first_sample … first_sample+B−1."""
    return sample_noise(keys, list(range(first_sample, first_sample + B)), S, E, sp_rank,
                        sp_size)


class VMoERouter(TopKRouter, MegamoeRouter):
    paper = ("V-MoE (Riquelme et al. 2021) Eq. 1-2, §4 Batch Prioritized Routing, App. A "
             "importance and load losses")
    causal = False
    selection_groups = ("token", "micro-batch")   # micro-batch with a capacity (and BPR)

    def __init__(self, config, pg_collection=None, *, noise_std: float = 1.0,
                 capacity_ratio: float | None = 1.05, eval_capacity_ratio: float | None = None,
                 capacity_multiple_of: int = 4, priority: str = "none",
                 importance_loss_coeff: float = 0.005, load_loss_coeff: float = 0.005,
                 seed: int = 0):
        super().__init__(config=config, pg_collection=pg_collection)
        assert priority in PRIORITIES, priority
        E = config.num_moe_experts
        self.sigma = noise_std / E                     # σ = noise_std / E
        self.capacity_ratio = capacity_ratio
        self.eval_capacity_ratio = (capacity_ratio if eval_capacity_ratio is None
                                    else eval_capacity_ratio)
        self.capacity_multiple_of = capacity_multiple_of
        self.priority = priority
        self.importance_loss_coeff = importance_loss_coeff
        self.load_loss_coeff = load_loss_coeff
        self.seed = seed
        self.shards = SequenceShards(selection_group("micro-batch", pg_collection,
                                                     config.sequence_parallel).group)
        self.register_buffer("noise_step", torch.zeros(1, dtype=torch.int64))  # model state

    @classmethod
    def options_from(cls, moe_cfg) -> dict:
        v = moe_cfg.vmoe
        return {"noise_std": v.noise_std, "capacity_ratio": v.capacity_ratio,
                "eval_capacity_ratio": v.eval_capacity_ratio,
                "capacity_multiple_of": v.capacity_multiple_of, "priority": v.priority,
                "importance_loss_coeff": v.importance_loss_coeff,
                "load_loss_coeff": v.load_loss_coeff, "seed": v.noise_seed}

    @classmethod
    def causal_for(cls, moe_cfg) -> bool:
        return moe_cfg.vmoe.capacity_ratio is None and moe_cfg.vmoe.eval_capacity_ratio is None

    @classmethod
    def selection_group_for(cls, moe_cfg) -> str:
        return "token" if cls.causal_for(moe_cfg) else "micro-batch"

    def is_causal(self) -> bool:
        return self.capacity_ratio is None and self.eval_capacity_ratio is None

    # -- noise ---------------------------------------------------------------------------------

    def noise(self, context: Context, S: int, B: int, E: int, like: torch.Tensor) -> torch.Tensor:
        """[T, E] σ·ε for this rank's tokens, a function of (step, layer, global position)."""
        sample_B = context.require("sample_index_B", "model.moe.vmoe.noise_std > 0 (training)")
        assert sample_B.shape == (B,), (sample_B.shape, B)
        eps_TE = sample_noise(self.noise_keys(), sample_B.tolist(), S, E, self.shards.rank,
                              self.shards.size)
        return (self.sigma * eps_TE).to(like)

    def noise_keys(self) -> tuple:
        """(seed, step, layer[, stream]) of this layer's draws (module docstring)."""
        keys = (self.seed, int(self.noise_step.item()), int(self.layer_number or 0))
        return keys + ((zlib.crc32(self.stream.encode()),) if self.stream else ())

    # -- selection and losses ------------------------------------------------------------------

    def select(self, gates_TE: torch.Tensor, batch: int, stats: dict | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts [T, k], kept [T, k]) for this rank's tokens of a `batch`-sample micro-batch;
        capacity and priority are decided over the whole micro-batch, in its batch order
        (their statistics go into `stats`)."""
        stats = {} if stats is None else stats
        ratio = self.capacity_ratio if self.training else self.eval_capacity_ratio
        if ratio is None:
            experts_Tk = torch.topk(gates_TE.detach(), self.topk, dim=-1).indices
            return experts_Tk, torch.ones_like(experts_Tk, dtype=torch.bool)
        gates_NE = self.shards.gather(gates_TE)
        capacity = vmoe_capacity(gates_NE.shape[0], self.topk, ratio, gates_NE.shape[1],
                                 self.capacity_multiple_of)
        experts_Nk, kept_Nk = assign_buffers(gates_NE, self.topk, capacity, self.priority,
                                             batch)
        stats["capacity"] = float(capacity)
        if self.priority != "none" and bool(kept_Nk[:, 0].any()):
            top_Nk = torch.topk(gates_NE.detach(), self.topk, dim=-1).values
            priority_N = top_Nk[:, 0] if self.priority == "max" else top_Nk.sum(-1)
            # BPR's effective threshold: the lowest priority whose top-1 choice still got a slot
            stats["threshold"] = priority_N[kept_Nk[:, 0]].min().item()
        return self.shards.local(experts_Nk), self.shards.local(kept_Nk)

    def extra_losses(self, logits_TE: torch.Tensor, context: Context, stats: dict) -> dict:
        """Further weighted micro-batch losses of subclasses (name -> scalar); their own
        statistics go into `stats`."""
        return {}

    def losses(self, logits_TE, noisy_TE, context, stats: dict) -> dict:
        """Weighted micro-batch losses (name -> scalar); gradients reach this rank's tokens."""
        out = {}
        if self.importance_loss_coeff > 0:
            importance_E = self.shards.sum_over_ranks(torch.softmax(logits_TE, dim=-1).sum(0))
            out["importance_loss"] = self.importance_loss_coeff * cv_squared(importance_E)
        if self.load_loss_coeff > 0 and noisy_TE is not logits_TE:
            p_TE = load_probabilities(logits_TE, noisy_TE, self.topk, self.sigma)
            load_E = self.shards.sum_over_ranks(p_TE.sum(0)) / (p_TE.shape[0] * self.shards.size)
            out["load_loss"] = self.load_loss_coeff * cv_squared(load_E)
        out.update(self.extra_losses(logits_TE, context, stats))
        return out

    def route(self, hidden_SBD: torch.Tensor, context: Context) -> RouterOutput:
        S, B = hidden_SBD.shape[:2]
        E = self.config.num_moe_experts
        logits_TE = self.gating(hidden_SBD).reshape(S * B, E)
        noisy_TE = logits_TE
        if self.training and self.sigma > 0:
            noisy_TE = logits_TE + self.noise(context, S, B, E, logits_TE)
        gates_TE = torch.softmax(noisy_TE, dim=-1)
        selection_stats, extra_stats = {}, {}
        experts_Tk, kept_Tk = self.select(gates_TE, B, selection_stats)
        weights_Tk = gates_TE.gather(1, experts_Tk) * kept_Tk      # not renormalised
        probs_TE = torch.zeros_like(gates_TE).scatter(1, experts_Tk, weights_Tk)
        routing_map_TE = torch.zeros_like(gates_TE, dtype=torch.bool).scatter(1, experts_Tk,
                                                                              kept_Tk)
        stats = routing_stats(gates_TE.detach(), routing_map_TE, self.topk)
        stats.update(selection_stats)
        aux = {}
        if self.training and torch.is_grad_enabled():
            aux = self.losses(logits_TE, noisy_TE, context, extra_stats)
            if aux:
                # per-token loss: Megatron divides every gradient by the token count, so the
                # micro-batch loss is weighted by its N tokens; every TP rank attaches the
                # whole loss, whose gradient reaches only its own tokens (sum_over_ranks)
                n = S * B * self.shards.size if self.calculate_per_token_loss else 1
                probs_TE = MoEAuxLossAutoScaler.apply(probs_TE, sum(aux.values()) * n)
        stats.update({name: value.item() for name, value in aux.items()})
        stats.update(extra_stats)
        return RouterOutput(probs_TE=probs_TE, routing_map_TE=routing_map_TE,
                            aux_losses={name: value.detach() for name, value in aux.items()},
                            tokens_per_expert_E=routing_map_TE.sum(dim=0).detach(), stats=stats)

    @torch.no_grad()
    def after_step(self) -> None:
        self.noise_step += 1
