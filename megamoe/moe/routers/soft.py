"""Soft MoE router (Puigcerver et al., "From Sparse to Soft Mixtures of Experts", arXiv
2308.00951, §2.1 Eq. 1-3 and Algorithm 1; code `google-research/vmoe`
`vmoe/projects/soft_moe/router.py`; papers.md §13c).

For the m tokens X of a group (here: one micro-batch) and slot parameters Φ (n experts × p
slots each):
- logits A = X Φ, with X's rows and Φ's columns l2-normalised and the smaller of the two
  multiplied by a learnable scalar `scale` (init 1) when `normalize` (the code's default);
- dispatch D = softmax of A over the tokens (per slot), combine C = softmax over the slots
  (per token), Eq. 1-2;
- slot inputs X̃ = Dᵀ X; slot s is processed by expert s // p; output Y = C Ỹ, Eq. 3.
No token is dropped and there is no auxiliary loss. The logit noise of the code (`noise_std`,
default 0) is not implemented.

Slots mix every token of the group, so the family is not causal. `SoftMoELayer`
(megamoe/moe/soft_layer.py) gathers the micro-batch over the TP group, asks `slots()` for X̃
and C, and sends the slots through Megatron's dispatcher as tokens routed deterministically
(slot s → expert s // p, weight 1) with `route()`.

Shapes: M tokens of the micro-batch, T tokens of this rank, N = n·p slots, E = n experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megamoe.blocks.context import Context
from megamoe.moe.routers.base import MegamoeRouter, RouterOutput


class L2NormScale(torch.nn.Module):
    """The learnable scalar of the l2-normalised logits (a norm weight: initialised to 1)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))


def soft_logits(x_MD: torch.Tensor, phi_ND: torch.Tensor,
                scale: torch.Tensor | None) -> torch.Tensor:
    """A = X Φ [M, N] in fp32; with `scale`, X and Φ are l2-normalised over D and the smaller
    of the two is multiplied by it (the reference code's normalisation)."""
    x_MD, phi_ND = x_MD.float(), phi_ND.float()
    if scale is not None:
        x_MD, phi_ND = F.normalize(x_MD, dim=-1), F.normalize(phi_ND, dim=-1)
        if x_MD.numel() < phi_ND.numel():
            x_MD = x_MD * scale
        else:
            phi_ND = phi_ND * scale
    return x_MD @ phi_ND.T


def dispatch_combine(logits_MN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D: softmax over tokens, C: softmax over slots), Eq. 1-2."""
    return torch.softmax(logits_MN, dim=0), torch.softmax(logits_MN, dim=1)


def _mean_entropy(p: torch.Tensor, dim: int) -> float:
    return -(p * p.clamp_min(1e-20).log()).sum(dim=dim).mean().item()


class SoftRouter(MegatronModule, MegamoeRouter):
    paper = "Soft MoE (Puigcerver et al. 2023, arXiv 2308.00951) §2.1, Eq. 1-3"
    causal = False
    selection_groups = ("micro-batch",)

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
        # every TP rank computes all slots from the gathered micro-batch but processes only
        # its share, so the parameter gradients are partial sums over the TP group
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

    def slots(self, x_MD: torch.Tensor, rows: slice, slot_rows: slice
              ) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(slot inputs X̃ = Dᵀ X for the slots `slot_rows` [N_r, D], combine weights C of the
        tokens `rows` [T, N], routing statistics); `x_MD` holds the whole group."""
        scale = self.l2_norm.weight if self.l2_norm is not None else None
        logits_MN = soft_logits(x_MD, self.weight, scale)
        dispatch_MN, combine_MN = dispatch_combine(logits_MN)
        slots_ND = dispatch_MN[:, slot_rows].T @ x_MD.float()
        with torch.no_grad():
            stats = {"dropped_fraction": 0.0, "router_entropy": _mean_entropy(combine_MN, dim=1),
                     "experts_per_token": float(self.num_experts)}
        return slots_ND.to(x_MD.dtype), combine_MN[rows], stats

    def route(self, hidden_SBD: torch.Tensor, context: Context, *, slot_offset: int = 0,
              stats: dict | None = None) -> RouterOutput:
        """Slots as tokens: slot s goes to expert s // p with weight 1 (`hidden_SBD` holds this
        rank's slot inputs, the first being slot `slot_offset`; `stats` from `slots`)."""
        n_slots = hidden_SBD.reshape(-1, hidden_SBD.shape[-1]).shape[0]
        slot_S = torch.arange(slot_offset, slot_offset + n_slots,
                              device=hidden_SBD.device)
        routing_map_SE = F.one_hot(slot_S // self.slots_per_expert, self.num_experts).bool()
        probs_SE = routing_map_SE.float()
        return RouterOutput(probs_TE=probs_SE, routing_map_TE=routing_map_SE,
                            tokens_per_expert_E=routing_map_SE.sum(dim=0), stats=stats or {})
