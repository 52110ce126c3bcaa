"""Soft MoE router (Puigcerver et al., "From Sparse to Soft Mixtures of Experts", arXiv
2308.00951, §2.1 Eq. 1-3 and Algorithm 1; code `google-research/vmoe`
`vmoe/projects/soft_moe/router.py`; papers.md §13c).

Each input sequence (one image, one sample of the micro-batch) is its own group, as in the paper
and the reference (`group_size` = the sequence length): slots never mix sequences. For the m
tokens X of a sequence and slot parameters Φ (n experts × p slots each):
- logits A = X Φ, with X's rows and Φ's columns normalised as x·rsqrt(Σx² + 1e-6) and the
  smaller of the two multiplied by a learnable scalar `scale` (init 1) when `normalize` (the
  code's default; either choice gives the same logits, the scalar factors out of X Φ);
- dispatch D = softmax of A over the sequence's m tokens (per slot), combine C = softmax over
  the n·p slots (per token), Eq. 1-2;
- slot inputs X̃ = Dᵀ X; slot s is processed by expert s // p; output Y = C Ỹ, Eq. 3.
Each sequence has its own n·p slots: p = round(m·C/n) from the sequence length m
(`config.derive`). No token is dropped and there is no auxiliary loss. The logit noise of the
code (`noise_std`, default 0) is not implemented.

Slots mix every position of a sequence, so the family is not causal in a decoder; a sample's
output does not depend on the other samples of its micro-batch. `SoftMoELayer`
(megamoe/moe/soft_layer.py) gathers the sequence shards over the TP group, asks `slots()` for
X̃ and C, and sends the slots through Megatron's dispatcher as tokens routed deterministically
(slot s → expert s // p, weight 1) with `route()`.

Checkpoints and exports made before this rule (slots over the whole micro-batch, p from the
micro-batch's token count) are refused (`SOFT_MOE_GROUPS`, a marker written from then on).

Shapes: S sequence length (gathered), S_l this rank's shard, B micro-batch, D hidden,
N = n·p slots of a sequence, N_r this TP rank's slots, E = n experts, R slot rows (slot, sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megamoe.blocks.context import Context
from megamoe.moe.routers.base import MegamoeRouter, RouterOutput


SOFT_MOE_GROUPS = "sequence"   # the marker: checkpoint meta.json / HF config.json field value
SOFT_MOE_CHANGE = ("Soft MoE's slots became per input sequence (dispatch and combine softmaxes "
                   "per sample, p = round(seq_length·C/n); megamoe issue 12): a model trained "
                   "with slots over the whole micro-batch cannot be loaded; retrain it")


class L2NormScale(torch.nn.Module):
    """The learnable scalar of the normalised logits (a norm weight: initialised to 1)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))


def unit_rows(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x · rsqrt(Σx² + eps) over the last dim (the reference's `normalize`)."""
    return x * torch.rsqrt(x.square().sum(dim=-1, keepdim=True) + eps)


def soft_logits(x_SBD: torch.Tensor, phi_ND: torch.Tensor,
                scale: torch.Tensor | None) -> torch.Tensor:
    """A = X Φ [S, B, N] (or [S, N] for one sequence [S, D]) in fp32; with `scale`, X and Φ
    are normalised over D and the smaller of one sequence's X and Φ is multiplied by it."""
    x_SBD, phi_ND = x_SBD.float(), phi_ND.float()
    if scale is not None:
        x_SBD, phi_ND = unit_rows(x_SBD), unit_rows(phi_ND)
        if x_SBD.shape[0] < phi_ND.shape[0]:
            x_SBD = x_SBD * scale
        else:
            phi_ND = phi_ND * scale
    return x_SBD @ phi_ND.T


def dispatch_combine(logits_SBN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D: softmax over each sequence's tokens, C: softmax over the slots), Eq. 1-2."""
    return torch.softmax(logits_SBN, dim=0), torch.softmax(logits_SBN, dim=-1)


def _mean_entropy(p: torch.Tensor, dim: int) -> float:
    return -(p * p.clamp_min(1e-20).log()).sum(dim=dim).mean().item()


class SoftRouter(MegatronModule, MegamoeRouter):
    paper = "Soft MoE (Puigcerver et al. 2023, arXiv 2308.00951) §2.1, Eq. 1-3"
    causal = False
    selection_groups = ("sequence",)

    def __init__(self, config, pg_collection=None, *, slots_per_expert: int,
                 normalize: bool = True):
        super().__init__(config)
        assert slots_per_expert and slots_per_expert >= 1, "filled by config.derive"
        self.num_experts = config.num_moe_experts
        self.slots_per_expert = slots_per_expert
        self.layer_number = None
        self.tp_group = pg_collection.tp
        N, D = self.num_experts * slots_per_expert, config.hidden_size
        self.weight = torch.nn.Parameter(torch.empty(N, D, dtype=torch.float32))   # Φᵀ
        torch.nn.init.normal_(self.weight, std=config.init_method_std)
        self.l2_norm = L2NormScale() if normalize else None
        # every TP rank computes all slots from the gathered sequences but processes only its
        # share, so the parameter gradients are partial sums over the TP group
        for p in self.parameters():
            setattr(p, "sequence_parallel", config.sequence_parallel)

    @classmethod
    def options_from(cls, moe_cfg) -> dict:
        return {"slots_per_expert": moe_cfg.soft.slots_per_expert,
                "normalize": moe_cfg.soft.normalize}

    @classmethod
    def extra_parameters(cls, moe_cfg, hidden: int, vocab_size: int) -> tuple[int, int]:
        """Φ [E·p, D] (+ the l2 scale) instead of an [E, D] gate; every token meets all slots."""
        n = moe_cfg.num_experts * moe_cfg.soft.slots_per_expert * hidden
        n += 1 if moe_cfg.soft.normalize else 0
        return n - moe_cfg.num_experts * hidden, n - moe_cfg.num_experts * hidden

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.slots_per_expert

    def slots(self, x_SBD: torch.Tensor, rows: slice, slot_rows: slice
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(slot inputs X̃ = Dᵀ X of each sequence for the slots `slot_rows` [N_r, B, D],
        combine weights C of the positions `rows` [S_l, B, N], routing statistics); `x_SBD`
        holds the whole sequences."""
        scale = self.l2_norm.weight if self.l2_norm is not None else None
        logits_SBN = soft_logits(x_SBD, self.weight, scale)
        dispatch_SBN, combine_SBN = dispatch_combine(logits_SBN)
        slots_NBD = torch.einsum("sbn,sbd->nbd", dispatch_SBN[..., slot_rows], x_SBD.float())
        with torch.no_grad():
            stats = {"dropped_fraction": 0.0,
                     "router_entropy": _mean_entropy(combine_SBN, dim=-1),
                     "experts_per_token": float(self.num_experts)}
        return slots_NBD.to(x_SBD.dtype), combine_SBN[rows], stats

    def route(self, hidden_SBD: torch.Tensor, context: Context, *, slot_offset: int = 0,
              batch: int = 1, stats: dict | None = None) -> RouterOutput:
        """Slots as tokens: slot s goes to expert s // p with weight 1. `hidden_SBD` holds this
        rank's slot inputs, slot-major ([N_r, B, D] flattened: row r is slot
        `slot_offset` + r // B of sample r % B); `stats` from `slots`."""
        n_rows = hidden_SBD.reshape(-1, hidden_SBD.shape[-1]).shape[0]
        slot_R = slot_offset + torch.arange(n_rows, device=hidden_SBD.device) // batch
        routing_map_SE = F.one_hot(slot_R // self.slots_per_expert, self.num_experts).bool()
        probs_SE = routing_map_SE.float()
        return RouterOutput(probs_TE=probs_SE, routing_map_TE=routing_map_SE,
                            tokens_per_expert_E=routing_map_SE.sum(dim=0), stats=stats or {})
