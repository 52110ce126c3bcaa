"""Diff-MoE (Cheng et al., "Diffusion Transformer with Time-Aware and Space-Adaptive Experts",
ICML 2025; code `kunncheng/Diff-MoE` `models.py`; papers.md §8a): a DiT-MoE gate made aware of
the diffusion timestep, and experts with their own timestep calibration.

- Gate: DiT-MoE's (softmax, top-2, raw weights, expert-level balance loss α Σ f_i P_i), with
  logits from the token and the timestep embedding c of its sample:
  logits = x Wᵀ + c W_cᵀ (`timestep_weight`, routing context `timestep_emb_BD`).
- Expert-specific timestep calibration (`MoeMLP_Temporal_Calibration`): expert e has its own
  low-rank adaLN (shift, scale, gate)_e = W2_e ReLU(W1_e c + b1_e) + b2_e, rank r, W2/b2
  zero-initialised (adaLN-Zero), and computes
  x'_e = x + gate_e ⊙ FFN_e(LN(x)(1 + scale_e) + shift_e); the MoE output is Σ_topk s_e x'_e.

Where the calibration runs: the per-token modulation depends on the (token, expert) pair and on
the token's sample, which the experts' ranks do not know. `DiffMoELayer` computes it on the
source rank, on the rows of Megatron's permutation (one row per (token, expert) pair, before
the all-to-all): each row is modulated before dispatch, the rows coming back from the combine
all-to-all are multiplied by their gate, and the residual Σ_topk s_e x is added after the
unpermute. The calibration parameters (E·r·(D_c + 3D) + E·(r + 3D)) sit with the router,
replicated on every rank, and receive the gradients of all their tokens there. The experts stay
Megatron's SequentialMLP (FFN_e), sharded by EP.

Not covered (papers.md §8a): the SE-style global recalibration w_global, the time-conditioned
shared expert (`MoeMLP_Temporal`; a shared expert here is Megatron's plain one) and the 5×5
depth-wise conv of the block. Dropless only (no capacity). With the synthetic timesteps of the
LM (from the first token of each sample) the family is causal.

Shapes: T tokens of this rank (S·B, Megatron order), B samples, E experts, D hidden, C timestep
embedding width, r calibration rank, R permuted rows (one per routed (token, expert) pair).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megamoe.blocks.context import Context, current_context
from megamoe.moe.layer import MegamoeMoELayer
from megamoe.moe.routers.base import RouterOutput, routing_stats
from megamoe.moe.routers.dit_moe import DiTMoERouter


class ExpertCalibration(torch.nn.Module):
    """Each expert's low-rank adaLN: c [B, C] → (shift, scale, gate) [B, E, D] each."""

    def __init__(self, num_experts: int, context_dim: int, rank: int, hidden: int):
        super().__init__()
        E = num_experts
        self.weight_in = torch.nn.Parameter(torch.empty(E, rank, context_dim))   # W1
        self.bias_in = torch.nn.Parameter(torch.zeros(E, rank))                   # b1
        self.adaln_zero_weight = torch.nn.Parameter(torch.zeros(E, 3 * hidden, rank))  # W2
        self.adaln_zero_bias = torch.nn.Parameter(torch.zeros(E, 3 * hidden))          # b2
        torch.nn.init.normal_(self.weight_in, std=0.02)

    def forward(self, c_BC: torch.Tensor):
        h_BEr = F.relu(torch.einsum("bc,erc->ber", c_BC, self.weight_in) + self.bias_in)
        mod_BE3D = torch.einsum("ber,edr->bed", h_BEr, self.adaln_zero_weight)
        return (mod_BE3D + self.adaln_zero_bias).chunk(3, dim=-1)


def calibrated_expert_input(x_RD, shift_RD, scale_RD):
    """x̂ = LN(x)(1 + scale) + shift (LayerNorm without affine parameters, as adaLN)."""
    return F.layer_norm(x_RD, x_RD.shape[-1:]) * (1 + scale_RD) + shift_RD


class DiffMoERouter(DiTMoERouter):
    paper = ("Diff-MoE (Cheng et al., ICML 2025) §3: timestep-conditioned DiT-MoE gate, "
             "expert-specific low-rank adaLN timestep calibration")
    needs_context = ("timestep_emb_BD",)
    selection_groups = ("token",)     # dropless: no capacity to compete for
    takes_padding_mask = False        # its own `route` (timestep-conditioned logits)

    def __init__(self, config, pg_collection=None, *, calibration_rank: int = 64,
                 loss_free_bias_rate: float = 0.0):
        super().__init__(config=config, pg_collection=pg_collection,
                         loss_free_bias_rate=loss_free_bias_rate)
        E, D = config.num_moe_experts, config.hidden_size
        self.timestep_weight = torch.nn.Parameter(torch.empty(E, D, dtype=torch.float32))  # W_c
        torch.nn.init.normal_(self.timestep_weight, std=config.init_method_std)
        self.calibration = ExpertCalibration(E, D, calibration_rank, D)
        # TP ranks hold different tokens of the same samples: partial gradients, summed by
        # Megatron's finalize step like the gate's own weight
        for p in [self.timestep_weight, *self.calibration.parameters()]:
            setattr(p, "sequence_parallel", config.sequence_parallel)

    @classmethod
    def options_from(cls, moe_cfg) -> dict:
        return {"calibration_rank": moe_cfg.diff_moe.calibration_rank,
                "loss_free_bias_rate": moe_cfg.loss_free_bias_rate}

    @classmethod
    def extra_parameters(cls, moe_cfg, hidden: int, vocab_size: int) -> tuple[int, int]:
        """W_c [E, D] (every token) and each expert's calibration (W1, b1, W2, b2; a token
        uses those of its k experts)."""
        E, D, r = moe_cfg.num_experts, hidden, moe_cfg.diff_moe.calibration_rank
        per_expert = r * D + r + 3 * D * r + 3 * D
        return E * D + E * per_expert, E * D + moe_cfg.topk * per_expert

    @staticmethod
    def timestep(context: Context, hidden_SBD: torch.Tensor) -> torch.Tensor:
        """c [B, C] (fp32) of the bound micro-batch."""
        c_BC = context.require("timestep_emb_BD", "router 'diff_moe'").to(hidden_SBD.device)
        assert c_BC.shape[0] == hidden_SBD.shape[1], (c_BC.shape, hidden_SBD.shape)
        return c_BC.float()

    def route(self, hidden_SBD: torch.Tensor, context: Context) -> RouterOutput:
        c_BC = self.timestep(context, hidden_SBD)
        logits_SBE = self.logits(hidden_SBD) + (c_BC @ self.timestep_weight.T)[None]
        probs_TE, routing_map_TE, scores_TE = self.routing_with_scores(logits_SBE)
        stats = routing_stats(scores_TE, routing_map_TE, self.topk)
        return RouterOutput(probs_TE=probs_TE, routing_map_TE=routing_map_TE,
                            tokens_per_expert_E=routing_map_TE.sum(dim=0).detach(), stats=stats)

    def modulation(self, c_BC: torch.Tensor, token_R: torch.Tensor, expert_R: torch.Tensor):
        """(shift, scale, gate) [R, D] of each permuted row (token t of sample t % B)."""
        shift_BED, scale_BED, gate_BED = self.calibration(c_BC)
        sample_R = token_R % c_BC.shape[0]
        return (shift_BED[sample_R, expert_R], scale_BED[sample_R, expert_R],
                gate_BED[sample_R, expert_R])


class DiffMoELayer(MegamoeMoELayer):
    """Megatron's MoE phases with Diff-MoE's per-(token, expert) calibration around the
    experts (see the module docstring): modulate the permuted rows before dispatch, gate them
    after the combine all-to-all, add the experts' residual after the unpermute. The gates and
    the residual are local values of this call."""

    def moe_forward(self, hidden_states, padding_mask=None):
        assert padding_mask is None, "router 'diff_moe' takes no padding mask"
        S, B, D = hidden_states.shape
        c_BC = self.router.timestep(current_context(), hidden_states)
        shared_SBD = self.shared_experts_compute(hidden_states)
        probs, routing_map = self.route(hidden_states)
        rows_RD, permuted_probs = self.preprocess(hidden_states, probs, routing_map)
        # Megatron's permutation is expert-major: expert 0's tokens in order, then expert 1's…
        T, E = routing_map.shape
        token_R = torch.arange(T, device=rows_RD.device).expand(E, T).masked_select(routing_map.T)
        expert_R = torch.arange(E, device=rows_RD.device).repeat_interleave(routing_map.sum(dim=0))
        assert token_R.shape[0] == rows_RD.shape[0], "dropless routing expected"
        shift_RD, scale_RD, gate_RD = self.router.modulation(c_BC, token_R, expert_R)
        x_TD = hidden_states.reshape(-1, D)
        residual_SBD = (x_TD * probs.sum(dim=-1, keepdim=True)).view(S, B, D)   # Σ_topk s_e x
        rows_RD = calibrated_expert_input(rows_RD.float(), shift_RD, scale_RD)
        tokens, permuted_probs = self.dispatch(rows_RD.to(hidden_states.dtype), permuted_probs)
        output, _ = self.routed_experts_compute(tokens, permuted_probs)
        rows_RD = self.token_dispatcher.token_combine(output)
        output = (rows_RD.float() * gate_RD).to(rows_RD.dtype)
        out_SBD = self.postprocess(output, shared_SBD)
        return out_SBD + residual_SBD.to(out_SBD.dtype), None
