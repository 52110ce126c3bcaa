"""Mixture-of-Recursions (Bae et al., arXiv 2507.10524) for megamoe's remote code: the recursion
block of a megamoe MoR decoder in inference mode, `config.mor` set (configuration_megamoe.py).

Shipped into exported folders next to modeling_megamoe.py (which builds it), so it imports only
torch. The decoder is: unique first layer → recursion block → unique last layer → final norm
(Middle-Cycle / Middle-Sequence sharing), or the recursion block alone (Cycle / Sequence).

Sharing (L unrolled layers, N_r recursions, K layers per step): the pool slot of unrolled layer ℓ
is ℓ mod K (cycle), ⌊ℓ/N_r⌋ (sequence); middle_*: 0 ↦ 0, L−1 ↦ K+1, else 1 + (ℓ−1) mod K
(middle_cycle) or 1 + ⌊(ℓ−1)/N_r⌋ (middle_sequence). Step r applies the slots of unrolled
layers [r·K, (r+1)·K) after the unique first layer.

Depth routing (eval mode, as megamoe's `model.eval()`):
- expert-choice: one Linear θ_r (D→1) per step; z = θ_r·(H/temperature), g = α·σ(z). The
  candidates of step r are the tokens kept at step r−1 (all at r = 0). `inference_rule`
  "threshold": keep a candidate iff σ(z) > 0.5 (causal), every candidate at a step of
  capacity C_r = 1 (as in training); "topk": per sequence the
  k_r = min(max(1, int(C_r·S)), #candidates) candidates of largest g (S the call's length; the
  official eval path, not causal). Kept tokens: H ← H + g·f(H) (`gating` weighted) or H + f(H)
  (additive), f the step's layer stack output (its residual included); others unchanged.
- token-choice: one Linear θ (D→N_r) on H¹, the block input; g = α·softmax(z) (or α·σ(z)),
  depth i_t = argmax_j(g_j + b_j) with the loss-free `router_bias` b (0 under `balancing`
  "loss"); token t runs steps 0..i_t: H^{r+1} = f(H^r), and the output is H¹ + g_{i_t}·f(H^{i_t})
  (additive: H¹ + f(H^{i_t})).

Attention at step r (computed with masks over the whole sequence instead of megamoe's compacted
batches, same result): a query sees the keys of the tokens active at step r at or before its
position (recursion-wise caching), RoPE at original positions; a token not active at step r is
left unchanged. MoE layers of the pool route only the step's active tokens, listed as megamoe's
compacted batch [K, B] lists them (`compact_order`), so that Megatron's capacity dropping
(`capacity_factor`) chooses among the same tokens in the same order. `kv_sharing`: steps
r > 0 attend to the K/V that step 0's j-th layer computed for the whole sequence (causal), so
step 0 must keep every token.

Per-recursion LoRA (Relaxed Recursive Transformers, Bae et al., arXiv 2410.20672; `mor`'s
`lora_rank` > 0): every application of a shared layer — step r, layer j of the step — adds its
own low-rank update to the target linears, W x + (α/rank)·B A x, α = `lora_alpha`. Adapters
`recursion.lora.{r}.{j}.{target}.{A,B}`, A [rank, d_in], B [d_out, rank]; `lora_targets` ⊆
qkv (q, k and v projections: one A, B's rows q_proj's, then k_proj's, then v_proj's), proj
(o_proj), fc1 (the dense FFN's gate and up projections: one A, B's rows gate's, then up's), fc2
(down_proj). fc1/fc2 need dense FFNs in the shared pool. The unique layers have no adapters.

Legend: B batch, S sequence, D hidden, R = N_r depths.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

SHARING = ("cycle", "sequence", "middle_cycle", "middle_sequence")
DEPTH_ROUTERS = ("expert", "token")
LORA_TARGETS = ("qkv", "proj", "fc1", "fc2")


# ---- parameter sharing -------------------------------------------------------------------------

def base_depth(sharing: str, num_layers: int, num_recursions: int) -> int:
    """K, the layers of one recursion step; ValueError when L does not split."""
    shared = num_layers - 2 if sharing.startswith("middle") else num_layers
    if shared < num_recursions or shared % num_recursions:
        raise ValueError(f"mor: num_hidden_layers {num_layers} does not split into "
                         f"{num_recursions} recursions with sharing {sharing!r}")
    return shared // num_recursions


def pool_index(sharing: str, num_layers: int, num_recursions: int) -> list[int]:
    """The pool slot of every unrolled layer."""
    K = base_depth(sharing, num_layers, num_recursions)
    if sharing == "cycle":
        return [ell % K for ell in range(num_layers)]
    if sharing == "sequence":
        return [ell // num_recursions for ell in range(num_layers)]
    inner = [1 + ((ell - 1) % K if sharing == "middle_cycle" else (ell - 1) // num_recursions)
             for ell in range(1, num_layers - 1)]
    return [0, *inner, K + 1]


def mor_layout(sharing: str, num_layers: int, num_recursions: int):
    """(unique slots, pool slots, steps): the unique layers' slots ([first, last] or []), the
    pool's slots in storage order, and per step the indices into the pool it applies."""
    index = pool_index(sharing, num_layers, num_recursions)
    K = base_depth(sharing, num_layers, num_recursions)
    middle = sharing.startswith("middle")
    unique = [0, K + 1] if middle else []
    start = 1 if middle else 0
    step_slots = [index[start + r * K:start + (r + 1) * K] for r in range(num_recursions)]
    pool = sorted({s for step in step_slots for s in step})
    steps = [tuple(pool.index(s) for s in step) for step in step_slots]
    return unique, pool, steps


def slot_is_moe(sharing: str, moe_layers, num_recursions: int) -> dict:
    """slot → MoE (1) or dense (0), read from the unrolled `moe_layers`; ValueError when two
    unrolled layers that share a slot disagree."""
    out = {}
    for ell, slot in enumerate(pool_index(sharing, len(moe_layers), num_recursions)):
        if out.setdefault(slot, moe_layers[ell]) != moe_layers[ell]:
            raise ValueError(f"moe_layers: unrolled layers sharing pool slot {slot} (mor "
                             f"sharing {sharing!r}) must all be MoE or all dense")
    return out


# ---- depth routers -----------------------------------------------------------------------------

class ExpertChoiceDepthRouter(nn.Module):
    """θ_1..θ_{N_r}: `routers.<r>.weight` [1, D]."""

    def __init__(self, hidden_size: int, mor: dict):
        super().__init__()
        self.alpha, self.temperature = mor["alpha"], mor["temperature"]
        self.capacities, self.rule = mor["capacities"], mor["inference_rule"]
        self.routers = nn.ModuleList(nn.Linear(hidden_size, 1, bias=False)
                                     for _ in range(mor["num_recursions"]))

    def step(self, r: int, h_BSD: torch.Tensor, cand_BS: torch.Tensor):
        """(keep [B, S] bool, gate g [B, S]) of step r among the candidates."""
        z_BS = self.routers[r](h_BSD / self.temperature).squeeze(-1)
        g_BS = self.alpha * torch.sigmoid(z_BS)
        if self.rule == "threshold":           # a step of capacity 1 keeps every candidate
            if self.capacities[r] >= 1:
                return cand_BS.clone(), g_BS
            return (torch.sigmoid(z_BS) > 0.5) & cand_BS, g_BS
        S = h_BSD.shape[1]
        k = min(max(1, int(self.capacities[r] * S)), int(cand_BS.sum(1).min()))
        top_BK = torch.topk(g_BS.masked_fill(~cand_BS, float("-inf")), k, dim=1).indices
        return torch.zeros_like(cand_BS).scatter_(1, top_BK, True), g_BS


class TokenChoiceDepthRouter(nn.Module):
    """θ: `router.weight` [R, D]; the loss-free selection bias `router_bias` [R]."""

    def __init__(self, hidden_size: int, mor: dict):
        super().__init__()
        R = mor["num_recursions"]
        self.alpha, self.temperature = mor["alpha"], mor["temperature"]
        self.score, self.loss_free = mor["token_score"], mor["token_balancing"] == "loss_free"
        self.router = nn.Linear(hidden_size, R, bias=False)
        self.register_buffer("router_bias", torch.zeros(R))

    def forward(self, h1_BSD: torch.Tensor):
        """(depth i_t [B, S], gate g_{i_t} [B, S])."""
        z_BSR = self.router(h1_BSD / self.temperature)
        probs = torch.softmax(z_BSR, -1) if self.score == "softmax" else torch.sigmoid(z_BSR)
        g_BSR = self.alpha * probs
        chooser_BSR = g_BSR + self.router_bias if self.loss_free else g_BSR
        depth_BS = chooser_BSR.argmax(-1)
        return depth_BS, torch.gather(g_BSR, -1, depth_BS[..., None]).squeeze(-1)


# ---- per-recursion LoRA ------------------------------------------------------------------------

class LoRALinear(nn.Module):
    """ΔW x = (α/rank)·B A x: the term one adapter adds to its linear's output."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float):
        super().__init__()
        self.scale = alpha / rank
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.empty(d_out, rank))

    def forward(self, x):
        return nn.functional.linear(nn.functional.linear(x, self.A), self.B) * self.scale


def lora_widths(config) -> dict:
    """target → (d_in, d_out) of the linear(s) it adapts."""
    D, d = config.hidden_size, config.head_dim
    H, G, F = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    return {"qkv": (D, (H + 2 * G) * d), "proj": (H * d, D), "fc1": (D, 2 * F), "fc2": (F, D)}


def build_lora(config, steps) -> nn.ModuleList | None:
    """`lora[r][j][target]` for every (step r, layer j of the step); None without LoRA."""
    mor = config.mor
    rank = mor.get("lora_rank", 0)
    if not rank:
        return None
    widths = lora_widths(config)
    return nn.ModuleList(
        nn.ModuleList(nn.ModuleDict({t: LoRALinear(*widths[t], rank, mor["lora_alpha"])
                                     for t in mor["lora_targets"]})
                      for _ in step)
        for step in steps)


# ---- the recursion block -----------------------------------------------------------------------

def compact_order(active_BS: torch.Tensor) -> torch.Tensor:
    """long [N]: the active tokens as indices t = s·B + b into the call's tokens (Megatron's
    order), listed as megamoe's compacted batch [K, B] holds them: the k-th active token (by
    position) of every sample for k = 0, 1, …, samples in order (its pads left out)."""
    B, S = active_BS.shape
    device = active_BS.device
    b_B1 = torch.arange(B, device=device)[:, None]
    rank_BS = active_BS.long().cumsum(1) - 1            # k: the token's rank in its sample
    t_BS = torch.arange(S, device=device)[None, :] * B + b_B1
    key_N = (rank_BS * B + b_B1)[active_BS]
    return t_BS[active_BS][key_N.argsort()]


def active_key_mask(active_BS: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True = visible: causal among the active tokens; an inactive query
    sees itself only (its output is discarded), so no row is empty."""
    S = active_BS.shape[1]
    causal_SS = torch.ones(S, S, dtype=torch.bool, device=active_BS.device).tril()
    eye_SS = torch.eye(S, dtype=torch.bool, device=active_BS.device)
    return ((causal_SS & active_BS[:, None, :]) | eye_SS)[:, None]


class MegamoeRecursion(nn.Module):
    """The shared pool `layers` (decoder layers of modeling_megamoe.py, built by the caller)
    applied at N_r steps, and the depth `router`."""

    def __init__(self, config, layers: nn.ModuleList, steps):
        super().__init__()
        mor = config.mor
        self.layers, self.steps = layers, [tuple(s) for s in steps]
        self.gating, self.kv_sharing = mor["gating"], mor["kv_sharing"]
        self.token_choice = mor["router"] == "token"
        cls = TokenChoiceDepthRouter if self.token_choice else ExpertChoiceDepthRouter
        self.router = cls(config.hidden_size, mor)
        self.lora = build_lora(config, self.steps)     # per-(r, j) adapters, or None
        self.last_kept: list = []          # tokens run at each step, [B] per step

    def forward(self, h_BSD, cos_BSd, sin_BSd, ctx):
        shared_kv: dict = {} if self.kv_sharing else None
        if self.token_choice:
            return self._token_choice(h_BSD, cos_BSd, sin_BSd, ctx, shared_kv)
        return self._expert_choice(h_BSD, cos_BSd, sin_BSd, ctx, shared_kv)

    def _expert_choice(self, h_BSD, cos_BSd, sin_BSd, ctx, shared_kv):
        cand_BS = torch.ones(h_BSD.shape[:2], dtype=torch.bool, device=h_BSD.device)
        self.last_kept = []
        for r in range(len(self.steps)):
            keep_BS, g_BS = self.router.step(r, h_BSD, cand_BS)
            f_BSD = self.run_step(r, h_BSD, keep_BS, cos_BSd, sin_BSd, ctx, shared_kv)
            if self.gating == "weighted":
                f_BSD = f_BSD * g_BS[..., None].to(f_BSD.dtype)
            h_BSD = torch.where(keep_BS[..., None], h_BSD + f_BSD, h_BSD)
            cand_BS = keep_BS
        return h_BSD

    def _token_choice(self, h_BSD, cos_BSd, sin_BSd, ctx, shared_kv):
        depth_BS, gate_BS = self.router(h_BSD)
        out_BSD, x_BSD = h_BSD, h_BSD
        self.last_kept = []
        for r in range(len(self.steps)):
            active_BS = depth_BS >= r
            f_BSD = self.run_step(r, x_BSD, active_BS, cos_BSd, sin_BSd, ctx, shared_kv)
            w_BS = gate_BS if self.gating == "weighted" else torch.ones_like(gate_BS)
            exit_BS1 = (depth_BS == r)[..., None]
            out_BSD = torch.where(exit_BS1, out_BSD + w_BS[..., None].to(f_BSD.dtype) * f_BSD,
                                  out_BSD)                      # H¹ + g·f(H^{i_t})
            x_BSD = torch.where(active_BS[..., None], f_BSD, x_BSD)
        return out_BSD

    def run_step(self, r, x_BSD, active_BS, cos_BSd, sin_BSd, ctx, shared_kv):
        """f(H) of step r's layers; meaningful on the active tokens only."""
        self.last_kept.append(active_BS.sum(1))
        reading = shared_kv is not None and r > 0
        if shared_kv is not None and r == 0 and not bool(active_BS.all()):
            raise ValueError("mor kv_sharing: the first recursion must run every token (its "
                             "K/V serve the later steps), but the depth router dropped some")
        if reading:                         # queries against step 0's K/V of every token
            S = x_BSD.shape[1]
            allowed_B1SS = torch.ones(S, S, dtype=torch.bool, device=x_BSD.device).tril()[None,
                                                                                         None]
        else:
            allowed_B1SS = active_key_mask(active_BS)
        ctx = dataclasses.replace(ctx, token_order=compact_order(active_BS))
        for j, idx in enumerate(self.steps[r]):
            hook = None
            if shared_kv is not None:
                hook = (lambda k, v, j=j: shared_kv[j]) if reading else \
                    (lambda k, v, j=j: shared_kv.setdefault(j, (k, v)))
            lora = self.lora[r][j] if self.lora is not None else None
            x_BSD = self.layers[idx](x_BSD, cos_BSd, sin_BSd, allowed_B1SS, None, ctx,
                                     kv_hook=hook, lora=lora)
        return x_BSD
