"""Expert-choice depth router of Mixture-of-Recursions (Bae et al., arXiv 2507.10524, Eq. 1;
papers.md §1.4; official code `model/mor_model/expert_choice_router.py`).

One linear router θ_r per recursion step r = 1..N_r. At step r the candidates are the tokens kept
at step r−1 (hierarchical filtering; all tokens at r = 1):

    z_t^r = θ_r^T (H_t^r / temp),    g_t^r = α·σ(z_t^r)    (α = 0.1)
    k_r   = max(1, int(C_r · S)),    C_r = (N_r − r + 1) / N_r   (S: the full sequence length)
    keep  = top-k_r of g over each sequence's candidates, sorted ascending (causal order)
    L_aux^r = (1 / (B·N_cand)) Σ_{b, t ∈ cand} BCEWithLogits(z_t^r, 1[t ∈ keep])  (§1.4.7)
    loss  = coeff · Σ_r L_aux^r                                                     (coeff 0.001)

Top-k over a sequence looks at future tokens, so training-time routing is not causal. At causal
inference a candidate continues iff σ(z_t^r) > 0.5 (the BCE trains σ towards 1 for kept tokens
and 0 for the others), except at a step of capacity C_r = 1, which keeps every candidate as in
training (so recursive KV sharing still sees the whole sequence at the first recursion);
`inference_rule="topk"` instead reproduces the official eval path.

Shapes: B batch, S sequence, N candidates of a step, K kept tokens, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from megamoe.config.mor import EXPERT_CHOICE_ALPHA
from megamoe.mor.compaction import compact_rows

ALPHA = EXPERT_CHOICE_ALPHA
AUX_LOSS_COEFF = 0.001


def capacity_schedule(num_recursions: int) -> list[float]:
    """C_r = (N_r − r + 1)/N_r for r = 1..N_r: N_r = 3 → [1, 2/3, 1/3]."""
    return [(num_recursions - r + 1) / num_recursions for r in range(1, num_recursions + 1)]


def tokens_kept(capacity: float, seq_len: int) -> int:
    """k_r = max(1, int(C_r · S)), S the full sequence length (not the candidates)."""
    return max(1, int(capacity * seq_len))


@dataclass
class DepthStep:
    """Routing of one recursion step. `selected_BK` are positions in the full sequence (ascending,
    0 where `valid_BK` is False); `gate_BK` the weights g of those tokens."""
    selected_BK: torch.Tensor
    valid_BK: torch.Tensor
    gate_BK: torch.Tensor
    aux_loss: torch.Tensor          # L_aux^r (BCE), unscaled (0 outside training)
    z_loss: torch.Tensor            # mean z² (optional, §1.4.8), unscaled
    stats: dict = field(default_factory=dict)


class ExpertChoiceDepthRouter(nn.Module):
    """θ_1..θ_{N_r} (Linear D→1, no bias, N(0, init_std)) and the selection rule of §1.4."""

    selection_groups = ("sequence",)    # top-k_r of each sequence's candidates

    def __init__(self, hidden_size: int, num_recursions: int, *, capacities=None,
                 alpha: float = ALPHA, temperature: float = 1.0,
                 aux_loss_coeff: float = AUX_LOSS_COEFF, z_loss_coeff: float = 0.0,
                 init_std: float = 0.02, inference_rule: str = "threshold"):
        super().__init__()
        capacities = list(capacities or capacity_schedule(num_recursions))
        if len(capacities) != num_recursions:
            raise ValueError(f"model.mor.capacities: {len(capacities)} values for "
                             f"num_recursions={num_recursions}")
        if any(not 0 < c <= 1 for c in capacities) or any(
                a < b for a, b in zip(capacities, capacities[1:])):
            raise ValueError(f"model.mor.capacities={capacities}: must lie in (0, 1] and be "
                             "non-increasing (hierarchical filtering)")
        if inference_rule not in ("threshold", "topk"):
            raise ValueError(f"model.mor.inference_rule={inference_rule!r}: threshold or topk")
        self.num_recursions = num_recursions
        self.capacities = capacities
        self.alpha, self.temperature = alpha, temperature
        self.aux_loss_coeff, self.z_loss_coeff = aux_loss_coeff, z_loss_coeff
        self.inference_rule = inference_rule
        self.routers = nn.ModuleList(nn.Linear(hidden_size, 1, bias=False)
                                     for _ in range(num_recursions))
        for lin in self.routers:
            nn.init.normal_(lin.weight, mean=0.0, std=init_std)

    def is_causal(self) -> bool:
        """Causal in inference with the σ > 0.5 rule only (DESIGN.md, Causality)."""
        return not self.training and self.inference_rule == "threshold"

    def logits(self, r: int, h_BND: torch.Tensor) -> torch.Tensor:
        """z^r for the candidates' hidden states: [B, N]."""
        return self.routers[r](h_BND / self.temperature).squeeze(-1)

    def threshold_keep(self, r: int, z: torch.Tensor) -> torch.Tensor:
        """The causal inference rule of step r for logits z (any shape): σ(z) > 0.5, except
        that a step of capacity C_r = 1 keeps every candidate (no decision to make)."""
        if self.capacities[r] >= 1:
            return torch.ones_like(z, dtype=torch.bool)
        return torch.sigmoid(z) > 0.5

    def step(self, r: int, h_BSD: torch.Tensor, prev: DepthStep | None) -> DepthStep:
        """Route recursion step r (0-based) given the previous step's kept tokens."""
        B, S, _ = h_BSD.shape
        if prev is None:
            cand_BN = torch.arange(S, device=h_BSD.device).expand(B, S)
            cand_valid_BN = torch.ones(B, S, dtype=torch.bool, device=h_BSD.device)
        else:
            cand_BN, cand_valid_BN = prev.selected_BK, prev.valid_BK
        h_BND = torch.gather(h_BSD, 1, cand_BN[..., None].expand(-1, -1, h_BSD.shape[-1]))
        z_BN = self.logits(r, h_BND)
        g_BN = self.alpha * torch.sigmoid(z_BN)
        use_topk = self.training or self.inference_rule == "topk"
        if use_topk:
            assert bool(cand_valid_BN.all()), "top-k routing keeps equal counts per sequence"
            k = min(tokens_kept(self.capacities[r], S), cand_BN.shape[1])
            top_BK = torch.topk(g_BN, k, dim=1).indices
            keep_BN = torch.zeros_like(cand_valid_BN).scatter_(1, top_BK, True)
        else:
            keep_BN = self.threshold_keep(r, z_BN) & cand_valid_BN
        selected_BK, valid_BK, gate_BK = compact_rows(keep_BN, cand_BN, g_BN)
        aux = z_loss = z_BN.new_zeros(())
        stats = {}
        if self.training:
            y_BN = keep_BN.to(z_BN.dtype)
            aux = F.binary_cross_entropy_with_logits(z_BN, y_BN)   # mean over B·N_cand
            z_loss = (z_BN ** 2).mean()     # logsumexp over a size-1 dim is z itself
            stats["sampling_acc"] = ((torch.sigmoid(z_BN) >= 0.5) == keep_BN).float().mean().item()
        stats["kept_fraction"] = (valid_BK.sum() / (B * S)).item()
        return DepthStep(selected_BK, valid_BK, gate_BK, aux, z_loss, stats)

    def total_loss(self, steps: list[DepthStep]) -> torch.Tensor:
        """coeff · Σ_r L_aux^r (+ z_coeff · Σ_r mean z²): the term added to the LM loss."""
        loss = self.aux_loss_coeff * torch.stack([s.aux_loss for s in steps]).sum()
        if self.z_loss_coeff:
            loss = loss + self.z_loss_coeff * torch.stack([s.z_loss for s in steps]).sum()
        return loss
