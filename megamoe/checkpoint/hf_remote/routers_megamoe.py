"""megamoe's router families as `modeling_megamoe.py` runs them: the *inference-mode* routing
of each family (megamoe's `model.eval()`), shipped next to the modeling code (self-contained:
torch only).

A router is built from the config (`build_router`) and called as
    router(x_TD, ctx) -> (probs_TE, map_TE)     combine weights, bool routing map
with the tokens of one forward call in Megatron's order (T = S·B, token t = (s, b = t mod B));
`ctx` holds the routing context (`RoutingInputs`). A token may go to any number of experts.
Soft MoE (`SoftRouter`) instead mixes the tokens into slots (`mix`). Every tensor a router
holds loads from `mlp.gate.<name>` (megamoe's `mlp.router.<name>`).

Families (model.moe.router), eval semantics:
- topk: s = softmax(l) or σ(l), l = x·Wᵀ; the k largest s (+ the loss-free `selection_bias` b
  when the model was trained with it: selection by s + b, weights s); ÷ Σ_topk s with
  `norm_topk_prob`. With `capacity_factor` (Megatron's token dropping, topk and dit_moe) each
  expert keeps c = ⌈(T·k/E)·capacity_factor⌉ of its routed tokens, chosen over the T tokens of
  the call (see `drop_over_capacity`); the others lose that expert (weight 0, no
  renormalisation).
- dit_moe: topk with softmax and raw weights (norm_topk_prob false).
- diff_moe: dit_moe with l = x·Wᵀ + c·W_cᵀ (c the sample's timestep embedding) and each
  expert's low-rank adaLN calibration (`DiffMoECalibration`), applied by the experts.
- moee: every expert, weights softmax(l).
- vmoe, limoe: g = softmax(l) (no noise in eval), the k largest g, not renormalised; with an
  eval capacity ratio C, each expert keeps ceil(N·k·C/E) (rounded up to a multiple of
  `capacity_multiple_of`) slots filled all top-1 choices before any top-2 choice, tokens in
  Batch Prioritized Routing order (`priority` max/sum, ties in batch order) or in batch order
  (sample by sample, position by position, as google-research/vmoe); overflow is dropped.
- expert_choice: s = softmax(l); expert e takes the tokens whose s[:, e] is at least the c-th
  largest of its column, c = ⌈k·T/E⌉ (at most T).
- race: s = l (or σ(l), softmax(l) by `gating`); in eval every (token, expert) with
  s ≥ τ_ema (the `threshold_ema` buffer) is routed with weight s. With PLR (`plr_coeff` > 0)
  the router is a 2-layer MLP, l = W·GELU(W_h·x) (`plr_hidden` W_h [D, D]); PLR's target head
  `plr_target` [V, D] only trains (it predicts the next token from GELU(W_h·x)): it is loaded
  and kept, never used here.
- diffmoe: s = softmax(l); the capacity predictor p = W₂·SiLU(W₁·x + b₁) + b₂
  (`capacity_predictor.{0,2}`) and the per-expert thresholds τ (`expert_threshold`); with
  `inference` threshold (t, e) is routed when σ(p_te) > τ_e (per token), with pool_topk expert
  e takes its k_e = #{t : σ(p_te) > τ_e} tokens of largest s over the call; weights s.
- modality: vlmo: modality m → expert m, weight 1 (in the top `vl_ffn_layers` layers every
  token → expert M); pools: top-k logits inside the modality's pool of experts, weights the
  softmax over the k selected logits.
- soft: Soft MoE slots, per input sequence (see `SoftRouter`).

topk/dit_moe with a capacity, vmoe/limoe with a capacity, expert_choice and diffmoe's pool_topk
choose over *all tokens of the call* (S × B), as megamoe's eval forward chooses over its
micro-batch: the outputs of a batch then depend on the batch's composition (other samples, later positions, padding),
exactly as megamoe's do. soft mixes the positions of each sample only: a sample's outputs do not
depend on the other samples. None of them is causal, and decoding with the KV cache (which
routes only the new tokens) differs from recomputing the whole prefix.

Legend: T tokens, D hidden, E experts, k experts per token, B samples, C timestep embedding
width (= D), r calibration rank, M modalities, N slots (E·p) or tokens of the group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

NUM_TIMESTEPS = 1000


# ---- routing context ---------------------------------------------------------------------------

@dataclass
class RoutingInputs:
    """What routers may read besides the hidden states, for the tokens of one call.
    `token_order` (Mixture-of-Recursions steps): the tokens the MoE layers route, as indices
    into the call's T tokens in the order of megamoe's compacted batch (mor_megamoe.py
    `compact_order`); None: all T in Megatron order."""
    batch: int                                   # B; token t belongs to sample t % B
    modality_T: Optional[torch.Tensor] = None    # int [T], Megatron order
    timestep_BC: Optional[torch.Tensor] = None   # float [B, C]
    token_order: Optional[torch.Tensor] = None   # long [N] ⊆ [0, T)


def synthetic_modality_ids(input_ids_BS: torch.Tensor, num_modalities: int) -> torch.Tensor:
    """megamoe's `data.synthetic_modalities` rule: modality id = token id mod M."""
    return input_ids_BS.long() % num_modalities


def synthetic_timesteps(input_ids_BS: torch.Tensor) -> torch.Tensor:
    """megamoe's `data.synthetic_timesteps` rule: t = (first token id · 37) mod 1000."""
    return (input_ids_BS[:, 0].long() * 37) % NUM_TIMESTEPS


def timestep_embedding(t_B: torch.Tensor, dim: int, max_period: float = 10_000.0):
    """[B, dim]: cos/sin of t at geometrically spaced frequencies (DDPM/DiT convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t_B.device) / half)
    angles_BH = t_B.float()[:, None] * freqs[None]
    emb_BC = torch.cat([torch.cos(angles_BH), torch.sin(angles_BH)], dim=-1)
    if dim % 2:
        emb_BC = torch.cat([emb_BC, torch.zeros_like(emb_BC[:, :1])], dim=-1)
    return emb_BC


# ---- token-choice routers ----------------------------------------------------------------------

def dense_from_topk(values_TE_like, idx_Tk, weights_Tk, kept_Tk=None):
    """(probs [T, E], map [T, E]) from per-token choices."""
    kept_Tk = torch.ones_like(idx_Tk, dtype=torch.bool) if kept_Tk is None else kept_Tk
    probs_TE = torch.zeros_like(values_TE_like).scatter(1, idx_Tk, weights_Tk * kept_Tk)
    map_TE = torch.zeros_like(values_TE_like, dtype=torch.bool).scatter(1, idx_Tk, kept_Tk)
    return probs_TE, map_TE


class GateLinear(nn.Module):
    """The router's gate W [E, D]; logits in fp32."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_experts
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))

    def logits(self, x_TD):
        return F.linear(x_TD.float(), self.weight.float())

    def init_router_weights(self, init, std):
        init.normal_(self.weight, mean=0.0, std=std)


def drop_over_capacity(probs_TE, map_TE, k: int, capacity_factor: float, policy: str,
                       pad: bool):
    """Megatron-Core 0.16's `apply_router_token_dropping` on the call's T tokens: expert e keeps
    c = ⌈(T·k/E)·capacity_factor⌉ tokens, those of largest weight (policy "probs") or, for
    "position", those `torch.topk` of the 0/1 routing column returns (Megatron's own call:
    which of the tied routed tokens it keeps is torch's choice, not the earliest ones). With
    `pad` (pad_to_capacity) every expert gets its c slots: the map is the capacity mask, whose
    extra tokens have weight 0 (same outputs)."""
    T, E = probs_TE.shape
    capacity = math.ceil((T * k / E) * capacity_factor)
    if capacity > T:
        return probs_TE, (torch.ones_like(map_TE) if pad else map_TE)
    ranked_TE = probs_TE if policy == "probs" else map_TE.int()
    idx_cE = torch.topk(ranked_TE, k=capacity, dim=0, sorted=False).indices
    keep_TE = torch.zeros_like(map_TE).scatter(0, idx_cE, True)
    final_TE = keep_TE if pad else map_TE & keep_TE
    return probs_TE * final_TE, final_TE


class TopKRouter(GateLinear):
    """topk and dit_moe (raw weights come from norm_topk_prob false); diff_moe's base.
    `last_dropped`: the (token, expert) choices the capacity dropped in the last call."""

    def __init__(self, config):
        super().__init__(config)
        self.k, self.score_function = config.num_experts_per_tok, config.score_function
        self.norm_topk_prob = config.norm_topk_prob
        self.capacity_factor = getattr(config, "capacity_factor", None)
        self.drop_policy = getattr(config, "token_drop_policy", "probs")
        self.pad_to_capacity = getattr(config, "pad_to_capacity", False)
        self.last_dropped = 0
        if config.loss_free_bias_rate > 0:     # DeepSeek loss-free balancing: b [E]
            self.register_buffer("selection_bias", torch.zeros(config.num_experts))
        else:
            self.selection_bias = None

    def select(self, logits_TE):
        if self.score_function == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
        else:
            scores_TE = torch.sigmoid(logits_TE)
        chooser_TE = scores_TE if self.selection_bias is None else scores_TE + self.selection_bias
        idx_Tk = torch.topk(chooser_TE, self.k, dim=-1).indices
        weights_Tk = scores_TE.gather(1, idx_Tk)
        if self.norm_topk_prob:
            weights_Tk = weights_Tk / (weights_Tk.sum(dim=-1, keepdim=True) + 1e-20)
        probs_TE, map_TE = dense_from_topk(scores_TE, idx_Tk, weights_Tk)
        if self.capacity_factor is None:
            return probs_TE, map_TE
        kept_probs_TE, final_TE = drop_over_capacity(probs_TE, map_TE, self.k,
                                                     self.capacity_factor, self.drop_policy,
                                                     self.pad_to_capacity)
        self.last_dropped = int((map_TE & ~final_TE).sum())
        return kept_probs_TE, final_TE

    def forward(self, x_TD, ctx):
        return self.select(self.logits(x_TD))


class DiffMoECalibration(nn.Module):
    """Each expert's low-rank adaLN (Diff-MoE): c [B, C] → (shift, scale, gate) [B, E, D]
    = W2_e ReLU(W1_e c + b1_e) + b2_e, chunked in three."""

    def __init__(self, config, rank: int):
        super().__init__()
        E, D = config.num_experts, config.hidden_size
        self.weight_in = nn.Parameter(torch.empty(E, rank, D))            # W1
        self.bias_in = nn.Parameter(torch.empty(E, rank))                 # b1
        self.adaln_zero_weight = nn.Parameter(torch.empty(E, 3 * D, rank))  # W2
        self.adaln_zero_bias = nn.Parameter(torch.empty(E, 3 * D))          # b2

    def forward(self, c_BC):
        h_BEr = F.relu(torch.einsum("bc,erc->ber", c_BC.float(), self.weight_in) + self.bias_in)
        mod_BE3D = torch.einsum("ber,edr->bed", h_BEr, self.adaln_zero_weight)
        return (mod_BE3D + self.adaln_zero_bias).chunk(3, dim=-1)


class DiffMoERouter(TopKRouter):
    """diff_moe: logits x·Wᵀ + c·W_cᵀ; `modulation` gives the experts their calibration."""

    def __init__(self, config):
        super().__init__(config)
        E, D = config.num_experts, config.hidden_size
        self.timestep_weight = nn.Parameter(torch.empty(E, D))             # W_c
        rank = config.router_options["diff_moe"]["calibration_rank"]
        self.calibration = DiffMoECalibration(config, rank)

    def forward(self, x_TD, ctx):
        c_BC = self.timestep(ctx)
        bias_BE = c_BC.float() @ self.timestep_weight.float().T
        T, B = x_TD.shape[0], ctx.batch
        logits_TE = self.logits(x_TD) + bias_BE.repeat(T // B, 1)   # token t: sample t % B
        return self.select(logits_TE)

    @staticmethod
    def timestep(ctx):
        if ctx.timestep_BC is None:
            raise ValueError("router 'diff_moe' needs the diffusion timestep: pass "
                             "`timesteps` [batch] to forward (the config records no "
                             "synthetic rule)")
        return ctx.timestep_BC

    def modulation(self, ctx):
        """(token t, expert e rows) → (shift, scale, gate) [R, D] each."""
        shift_BED, scale_BED, gate_BED = self.calibration(self.timestep(ctx))

        def rows(token_R, e):
            sample_R = token_R % ctx.batch
            return shift_BED[sample_R, e], scale_BED[sample_R, e], gate_BED[sample_R, e]
        return rows

    def init_router_weights(self, init, std):
        super().init_router_weights(init, std)
        init.normal_(self.timestep_weight, mean=0.0, std=std)
        init.normal_(self.calibration.weight_in, mean=0.0, std=0.02)
        for p in (self.calibration.bias_in, self.calibration.adaln_zero_weight,
                  self.calibration.adaln_zero_bias):
            init.zeros_(p)


class MoEERouter(GateLinear):
    """moee: every expert, weights softmax(l)."""

    def forward(self, x_TD, ctx):
        probs_TE = torch.softmax(self.logits(x_TD), dim=-1)
        return probs_TE, torch.ones_like(probs_TE, dtype=torch.bool)


def vmoe_capacity(num_tokens: int, k: int, ratio: float, num_experts: int, multiple_of: int):
    """Slots per expert: ceil(N·k·C/E), rounded up to a multiple of `multiple_of`."""
    capacity = math.ceil(num_tokens * k * ratio / num_experts)
    if multiple_of > 1 and capacity % multiple_of:
        capacity += multiple_of - capacity % multiple_of
    return capacity


def assign_buffers(gates_NE, k: int, capacity: int, priority: str, batch: int):
    """(experts [N, k], kept [N, k]) for N = S·B tokens in Megatron's order: top-1 choices fill
    the slots before top-2 choices; within a choice tokens go in batch order (sample by sample,
    position by position) or in priority order (stable: ties in batch order)."""
    top = torch.topk(gates_NE, k, dim=-1)
    N, E = gates_NE.shape
    order_N = torch.arange(N, device=gates_NE.device).view(N // batch, batch).t().reshape(-1)
    if priority != "none":
        score_N = top.values[:, 0] if priority == "max" else top.values.sum(dim=-1)
        order_N = order_N[torch.argsort(score_N[order_N], descending=True, stable=True)]
    onehot_kNE = F.one_hot(top.indices[order_N].t(), E)
    position_kN = (onehot_kNE.reshape(k * N, E).cumsum(0).reshape(k, N, E)
                   * onehot_kNE).sum(-1) - 1
    kept_Nk = torch.empty_like(top.indices, dtype=torch.bool)
    kept_Nk[order_N] = (position_kN < capacity).t()
    return top.indices, kept_Nk


class VMoERouter(GateLinear):
    """vmoe and limoe in eval: clean softmax gates, top-k, eval capacity with BPR."""

    def __init__(self, config):
        super().__init__(config)
        o = config.router_options["vmoe"]
        self.k = config.num_experts_per_tok
        self.ratio = (o["capacity_ratio"] if o["eval_capacity_ratio"] is None
                      else o["eval_capacity_ratio"])
        self.multiple_of, self.priority = o["capacity_multiple_of"], o["priority"]
        self.register_buffer("noise_step", torch.zeros(1))   # training state, unused here

    def forward(self, x_TD, ctx):
        gates_TE = torch.softmax(self.logits(x_TD), dim=-1)
        if self.ratio is None:
            idx_Tk, kept_Tk = torch.topk(gates_TE, self.k, dim=-1).indices, None
        else:
            capacity = vmoe_capacity(gates_TE.shape[0], self.k, self.ratio, self.num_experts,
                                     self.multiple_of)
            idx_Tk, kept_Tk = assign_buffers(gates_TE, self.k, capacity, self.priority,
                                             ctx.batch)
        return dense_from_topk(gates_TE, idx_Tk, gates_TE.gather(1, idx_Tk), kept_Tk)


# ---- routers that select over the group ----------------------------------------------------------

class ExpertChoiceRouter(GateLinear):
    """expert_choice: expert e takes its ⌈k·T/E⌉ tokens of largest softmax score."""

    def __init__(self, config):
        super().__init__(config)
        self.k = config.num_experts_per_tok

    def forward(self, x_TD, ctx):
        scores_TE = torch.softmax(self.logits(x_TD), dim=-1)
        T = scores_TE.shape[0]
        capacity = min(T, math.ceil((T / self.num_experts) * self.k))
        threshold_E = torch.topk(scores_TE, capacity, dim=0).values[-1]
        map_TE = scores_TE >= threshold_E
        return scores_TE * map_TE, map_TE


class RaceRouter(GateLinear):
    """race in eval: route (t, e) when s_te ≥ τ_ema; with PLR the logits come from the hidden
    layer, l = W·GELU(W_h·x)."""

    def __init__(self, config):
        super().__init__(config)
        o = config.router_options["race"]
        self.gating = o["gating"]
        self.register_buffer("threshold_ema", torch.zeros(1))
        self.register_buffer("threshold_updates", torch.zeros(1))   # training state, unused
        self.plr_hidden = self.plr_target = None
        if o.get("plr_coeff", 0.0) > 0:
            D = config.hidden_size
            self.plr_hidden = nn.Parameter(torch.empty(D, D))                   # W_h
            self.plr_target = nn.Parameter(torch.empty(config.vocab_size, D))   # training only

    def logits(self, x_TD):
        if self.plr_hidden is None:
            return super().logits(x_TD)
        h_TD = F.gelu(F.linear(x_TD.float(), self.plr_hidden.float()))
        return F.linear(h_TD, self.weight.float())

    def init_router_weights(self, init, std):
        super().init_router_weights(init, std)
        if self.plr_hidden is not None:
            init.normal_(self.plr_hidden, mean=0.0, std=std)
            init.normal_(self.plr_target, mean=0.0, std=std)

    def forward(self, x_TD, ctx):
        logits_TE = self.logits(x_TD)
        if self.gating == "identity":
            scores_TE = logits_TE
        elif self.gating == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
        else:
            scores_TE = torch.softmax(logits_TE, dim=-1)
        map_TE = scores_TE >= self.threshold_ema[0]
        return scores_TE * map_TE, map_TE


class DiffMoEPoolRouter(GateLinear):
    """diffmoe in eval: the capacity predictor's σ(p_te) against the thresholds τ_e."""

    def __init__(self, config):
        super().__init__(config)
        D, E = config.hidden_size, config.num_experts
        self.inference = config.router_options["diffmoe"]["inference"]
        self.capacity_predictor = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, E))
        self.register_buffer("expert_threshold", torch.zeros(E))

    def forward(self, x_TD, ctx):
        scores_TE = torch.softmax(self.logits(x_TD), dim=-1)
        passing_TE = torch.sigmoid(self.capacity_predictor(x_TD).float()) > self.expert_threshold
        if self.inference == "threshold":
            map_TE = passing_TE
        else:
            k_E = passing_TE.sum(0)
            ranked_TE = scores_TE.sort(dim=0, descending=True).values
            cut_E = ranked_TE.gather(0, (k_E.clamp_min(1) - 1)[None]).squeeze(0)
            map_TE = (scores_TE >= cut_E) & (k_E > 0)
        return scores_TE * map_TE, map_TE


class ModalityRouter(GateLinear):
    """modality: VLMo modality experts or Uni-MoE pools (the gate is used by pools only)."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config)
        o = config.router_options["modality"]
        self.mode, self.M, self.k = o["mode"], o["num_modalities"], config.num_experts_per_tok
        self.vl_layer = layer_idx + 1 > config.num_hidden_layers - o["vl_ffn_layers"]
        # pools: consecutive blocks of experts (a plain list: buffers made in __init__ are not
        # materialised by from_pretrained's meta-device init)
        self.pool_sizes = list(o["pool_sizes"]) or [config.num_experts // self.M] * self.M

    def forward(self, x_TD, ctx):
        if ctx.modality_T is None:
            raise ValueError("router 'modality' needs modality ids: pass `modality_ids` "
                             "[batch, seq] to forward (the model was not trained with "
                             "synthetic modalities)")
        modality_T = ctx.modality_T.long()
        if int(modality_T.min()) < 0 or int(modality_T.max()) >= self.M:
            raise ValueError(f"modality_ids: must lie in [0, {self.M}) (num_modalities)")
        E = self.num_experts
        if self.mode == "vlmo":
            expert_T = torch.full_like(modality_T, self.M) if self.vl_layer else modality_T
            map_TE = F.one_hot(expert_T, E).bool()
            return map_TE.float(), map_TE
        logits_TE = self.logits(x_TD)
        pool_E = torch.repeat_interleave(torch.arange(self.M, device=x_TD.device),
                                         torch.tensor(self.pool_sizes, device=x_TD.device))
        allowed_TE = pool_E[None, :] == modality_T[:, None]
        top = torch.topk(logits_TE.masked_fill(~allowed_TE, float("-inf")), self.k, dim=-1)
        return dense_from_topk(logits_TE, top.indices, torch.softmax(top.values, dim=-1))


class SoftRouter(nn.Module):
    """Soft MoE per input sequence (the paper's and google-research/vmoe's groups): for the S
    tokens X_b [S, D] of each sample, A = X_b Φ (rows of X_b and Φ scaled by rsqrt(Σx² + 1e-6),
    the smaller of the two times `l2_norm.weight`, when `normalize`); D = softmax of A over the
    sequence's tokens, C = softmax over its n·p slots; slot inputs X̃_b = Dᵀ X_b, slot s goes
    to expert s // p, Y_b = C Ỹ_b. Slots never mix samples."""

    def __init__(self, config):
        super().__init__()
        o = config.router_options["soft"]
        self.p = o["slots_per_expert"]
        self.weight = nn.Parameter(torch.empty(config.num_experts * self.p, config.hidden_size))
        self.l2_norm = nn.Module() if o["normalize"] else None
        if self.l2_norm is not None:
            self.l2_norm.weight = nn.Parameter(torch.empty(1))

    @staticmethod
    def unit_rows(x, eps: float = 1e-6):
        return x * torch.rsqrt(x.square().sum(dim=-1, keepdim=True) + eps)

    def mix(self, x_TD, expert_ffn, batch: int):
        """Y [T, D] for the call's tokens in Megatron's order (token t: sample t % batch)."""
        T, D = x_TD.shape
        x_SBD = x_TD.view(T // batch, batch, D)
        x32_SBD, phi_ND = x_SBD.float(), self.weight.float()
        if self.l2_norm is not None:
            x32_SBD, phi_ND = self.unit_rows(x32_SBD), self.unit_rows(phi_ND)
            if x32_SBD.shape[0] < phi_ND.shape[0]:
                x32_SBD = x32_SBD * self.l2_norm.weight
            else:
                phi_ND = phi_ND * self.l2_norm.weight
        logits_SBN = x32_SBD @ phi_ND.T
        dispatch_SBN, combine_SBN = logits_SBN.softmax(dim=0), logits_SBN.softmax(dim=-1)
        slots_NBD = torch.einsum("sbn,sbd->nbd", dispatch_SBN, x_SBD.float()).to(x_TD.dtype)
        out_NBD = torch.cat([expert_ffn(e, slots_NBD[e * self.p:(e + 1) * self.p]
                                        .reshape(-1, D)).view(self.p, batch, D)
                             for e in range(slots_NBD.shape[0] // self.p)])
        y_SBD = torch.einsum("sbn,nbd->sbd", combine_SBN, out_NBD.float())
        return y_SBD.reshape(T, D).to(x_TD.dtype)

    def init_router_weights(self, init, std):
        init.normal_(self.weight, mean=0.0, std=std)
        if self.l2_norm is not None:
            init.ones_(self.l2_norm.weight)


ROUTERS = {"topk": TopKRouter, "dit_moe": TopKRouter, "diff_moe": DiffMoERouter,
           "moee": MoEERouter, "vmoe": VMoERouter, "limoe": VMoERouter,
           "expert_choice": ExpertChoiceRouter, "race": RaceRouter,
           "modality": ModalityRouter, "soft": SoftRouter, "diffmoe": DiffMoEPoolRouter}


def build_router(config, layer_idx: int) -> nn.Module:
    cls = ROUTERS[config.router]
    return cls(config, layer_idx) if cls is ModalityRouter else cls(config)
