"""Token-choice depth router of Mixture-of-Recursions (Bae et al., arXiv 2507.10524, Eq. 2;
papers.md §1.5; official code `model/mor_model/token_choice_router.py`, `util/trainer_pt.py`).

One router θ (Linear D→N_r, no bias) on H^1, the input of the first recursion:

    z_t = θ^T (H_t^1 / temp),   g_t = α·softmax(z_t)  (α = 1)   [or α·σ(z_t), α = 0.1]
    i_t = argmax_j (g_t^j + b_j)   (b: loss-free bias, selection only; 0 with the loss)
    token t runs recursions 0..i_t (0-based depth), its gate is the unbiased g_t^{i_t}

    L_bal = Σ_i f_i P_i,  f_i = N_r·(1/T)Σ_t 1[i_t = i],  P_i = (1/T)Σ_t g_t^i   (coeff 0.1)
    L_z   = mean_t (logsumexp_j z_t^j)²   (coeff: 1e-5 in the official config, 1e-3 in
                                           the paper's appendix caption, papers.md §16.2)
    loss-free: after each optimiser step, with ratio_i the assignment fraction averaged over the
    step's micro-batches, ε_i = mean(ratio) − ratio_i and b_i ← b_i + u·sign(ε_i), u = 0.001

Each token decides its depth from its own hidden state: token-choice routing is causal.
Shapes: B batch, S sequence, R = N_r depths, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from megamoe.config.mor import TOKEN_CHOICE_ALPHA

BALANCE_COEFF = 0.1
Z_LOSS_COEFF = 1e-5      # official config; the appendix caption says 1e-3
BIAS_RATE = 0.001


def default_alpha(score: str) -> float:
    """α when the config leaves it unset: 1 for softmax scores, 0.1 for sigmoid (§1.5)."""
    return TOKEN_CHOICE_ALPHA["softmax" if score == "softmax" else "sigmoid"]


@dataclass
class DepthAssignment:
    depth_BS: torch.Tensor          # i_t, 0-based: the token runs recursions 0..i_t
    gate_BS: torch.Tensor           # g_t^{i_t}, unbiased
    balance_loss: torch.Tensor      # L_bal, unscaled (0 with the loss-free bias)
    z_loss: torch.Tensor            # L_z, unscaled
    ratio_R: torch.Tensor           # assignment fraction per depth
    stats: dict = field(default_factory=dict)


class TokenChoiceDepthRouter(nn.Module):
    selection_groups = ("token",)       # each token picks its depth

    def __init__(self, hidden_size: int, num_recursions: int, *, score: str = "softmax",
                 alpha: float | None = None, temperature: float = 1.0,
                 balancing: str = "loss", balance_coeff: float = BALANCE_COEFF,
                 z_loss_coeff: float = Z_LOSS_COEFF, bias_rate: float = BIAS_RATE,
                 init_std: float = 0.02):
        super().__init__()
        if score not in ("softmax", "sigmoid"):
            raise ValueError(f"model.mor.token.score={score!r}: softmax or sigmoid")
        if balancing not in ("loss", "loss_free"):
            raise ValueError(f"model.mor.token.balancing={balancing!r}: loss or loss_free")
        self.num_recursions = num_recursions
        self.score = score
        self.alpha = alpha if alpha is not None else default_alpha(score)
        self.temperature = temperature
        self.balancing = balancing
        self.balance_coeff, self.z_loss_coeff = balance_coeff, z_loss_coeff
        self.bias_rate = bias_rate
        self.router = nn.Linear(hidden_size, num_recursions, bias=False)
        nn.init.normal_(self.router.weight, mean=0.0, std=init_std)
        # b: selection-only bias (persistent: it is model state); ratio sums since the last update
        self.register_buffer("router_bias", torch.zeros(num_recursions))
        self.register_buffer("ratio_sum", torch.zeros(num_recursions), persistent=False)
        self.register_buffer("ratio_count", torch.zeros(()), persistent=False)

    def is_causal(self) -> bool:
        return True

    def scores(self, z_BSR: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(z_BSR, -1) if self.score == "softmax" else torch.sigmoid(z_BSR)
        return self.alpha * probs

    def assign(self, h1_BSD: torch.Tensor):
        """(z [B, S, R], g [B, S, R], depth i_t [B, S], gate g_t^{i_t} [B, S]): the routing
        decision alone (what cached generation needs; `forward` adds losses and counts)."""
        z_BSR = self.router(h1_BSD / self.temperature)
        g_BSR = self.scores(z_BSR)
        biased_BSR = g_BSR + self.router_bias if self.balancing == "loss_free" else g_BSR
        depth_BS = biased_BSR.argmax(-1)
        gate_BS = torch.gather(g_BSR, -1, depth_BS[..., None]).squeeze(-1)
        return z_BSR, g_BSR, depth_BS, gate_BS

    def forward(self, h1_BSD: torch.Tensor) -> DepthAssignment:
        z_BSR, g_BSR, depth_BS, gate_BS = self.assign(h1_BSD)
        R = self.num_recursions
        counts_R = torch.bincount(depth_BS.reshape(-1), minlength=R).to(g_BSR.dtype)
        ratio_R = counts_R / depth_BS.numel()
        zero = g_BSR.new_zeros(())
        balance = zero
        if self.balancing == "loss":
            P_R = g_BSR.reshape(-1, R).mean(0)
            balance = (R * ratio_R * P_R).sum()
        z_loss = (torch.logsumexp(z_BSR, -1) ** 2).mean()
        if self.training and torch.is_grad_enabled():   # once per micro-batch under recompute
            with torch.no_grad():
                self.ratio_sum += ratio_R.detach()
                self.ratio_count += 1
        stats = {f"depth_{i}_fraction": ratio_R[i].item() for i in range(R)}
        return DepthAssignment(depth_BS, gate_BS, balance, z_loss, ratio_R, stats)

    def total_loss(self, a: DepthAssignment) -> torch.Tensor:
        """coeff_bal · L_bal + coeff_z · L_z: the term added to the LM loss."""
        loss = self.z_loss_coeff * a.z_loss if self.z_loss_coeff else a.z_loss.new_zeros(())
        if self.balancing == "loss":
            loss = loss + self.balance_coeff * a.balance_loss
        return loss

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """Loss-free sign rule, once after each optimiser step; returns Δb. Under data
        parallelism the ratio sums must first be all-reduced (mean) over the DP group."""
        delta_R = torch.zeros_like(self.router_bias)
        if self.balancing == "loss_free" and self.ratio_count > 0:
            ratio_R = self.ratio_sum / self.ratio_count
            delta_R = self.bias_rate * torch.sign(ratio_R.mean() - ratio_R)
            self.router_bias += delta_R
        self.ratio_sum.zero_()
        self.ratio_count.zero_()
        return delta_R
