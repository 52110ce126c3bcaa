"""Parameters and training FLOPs of a Mixture-of-Recursions model (papers.md §1.8: forward =
2·params for linear ops plus causal attention, backward = 2× forward; the per-recursion sequence
length comes from the capacity; token-choice assumes perfect balance).

Per token, unrolled layer ℓ of recursion step r runs for a fraction f_r of the tokens:
- expert-choice: f_r = k_r / S with k_r = max(1, int(C_r·S)) (the tokens really kept);
- token-choice:  f_r = (N_r − r)/N_r for r = 0..N_r−1 (depths uniform over 0..N_r−1);
unique layers run for every token (f = 1).

Attention per layer in megamoe's convention (megamoe.models.accounting): 6·S·h·d per token for the full
causal sequence. With recursion-wise caching step r attends among its k_r = f_r·S tokens:
6·h·d·k_r²/S per token of the sequence; with recursive KV sharing queries of step r > 0 see
all S first-recursion keys: 6·h·d·k_r.

Total parameters count the pool once; "active" is the expected number a token passes through.
Per-recursion LoRA adapters (`model.mor.lora_rank`, lora.py) are counted per unrolled position
(r, j): R·(d_in + d_out) each, active for the f_r of the tokens that run step r.
"""

from __future__ import annotations

from megamoe.mor.expert_choice import capacity_schedule, tokens_kept
from megamoe.mor.sharing import sharing_plan


def step_fractions(cfg, fractions=None) -> list[float]:
    """f_r: the share of a sequence's tokens that run recursion step r (`fractions`: measured
    shares to use instead of the nominal ones; every function below takes them through)."""
    if fractions is not None:
        return list(fractions)
    mor, S = cfg.model.mor, cfg.model.seq_length
    R = mor.num_recursions
    if mor.router == "token":
        return [(R - r) / R for r in range(R)]
    caps = mor.capacities or capacity_schedule(R)
    return [tokens_kept(c, S) / S for c in caps]


def _unrolled(cfg, fractions=None):
    """(pool slot, fraction of tokens, step or None) of every unrolled layer."""
    from megamoe.mor.checks import mor_moe_slots

    m, mor = cfg.model, cfg.model.mor
    plan = sharing_plan(mor.sharing, m.num_layers, mor.num_recursions)
    moe_slots = mor_moe_slots(cfg) if m.moe.num_experts else set()
    f = step_fractions(cfg, fractions)
    rows = [(plan.first_unique, 1.0, None)] if plan.first_unique is not None else []
    rows += [(slot, f[r], r) for r, step in enumerate(plan.recursion_steps()) for slot in step]
    if plan.last_unique is not None:
        rows.append((plan.last_unique, 1.0, None))
    return plan, moe_slots, rows


def router_parameters(cfg, fractions=None) -> tuple[int, float]:
    """(total, active per token) of the depth router: expert θ_r on step r's candidates
    (the tokens of step r − 1), token-choice one D→N_r linear on every token."""
    mor, h = cfg.model.mor, cfg.model.hidden_size
    R = mor.num_recursions
    if mor.router == "token":
        return h * R, float(h * R)
    f = step_fractions(cfg, fractions)
    return h * R, float(h * sum([1.0] + f[:-1]))


def lora_adapter_size(cfg, target: str) -> int:
    """R·(d_in + d_out) of one adapter on `target` (fc1: SwiGLU's gate and up halves)."""
    m = cfg.model
    h, heads = m.hidden_size, m.num_attention_heads
    d = m.kv_channels or h // heads
    groups = m.num_query_groups or heads
    d_in, d_out = {"qkv": (h, (heads + 2 * groups) * d), "proj": (heads * d, h),
                   "fc1": (h, 2 * m.ffn_hidden_size), "fc2": (m.ffn_hidden_size, h)}[target]
    return m.mor.lora_rank * (d_in + d_out)


def lora_parameters(cfg, fractions=None) -> tuple[int, float]:
    """(total, active per token) of the per-recursion LoRA adapters."""
    mor = cfg.model.mor
    if not mor.lora_rank:
        return 0, 0.0
    per_position = sum(lora_adapter_size(cfg, t) for t in mor.lora_targets)
    steps = sharing_plan(mor.sharing, cfg.model.num_layers, mor.num_recursions).recursion_steps()
    f = step_fractions(cfg, fractions)
    return (per_position * sum(len(s) for s in steps),
            per_position * sum(f[r] * len(s) for r, s in enumerate(steps)))


def mor_parameter_counts(cfg, vocab_size: int, fractions=None) -> tuple[int, int]:
    from megamoe.specs.accounting import embedding_parameters, layer_parameters

    plan, moe_slots, rows = _unrolled(cfg, fractions)
    total = active = embedding_parameters(cfg, vocab_size)
    for slot in range(plan.pool_size):
        total += layer_parameters(cfg, slot in moe_slots)[0]
    active_f = float(active)
    for slot, frac, _ in rows:
        active_f += frac * layer_parameters(cfg, slot in moe_slots)[1]
    r_total, r_active = router_parameters(cfg, fractions)
    l_total, l_active = lora_parameters(cfg, fractions)
    return total + r_total + l_total, round(active_f + r_active + l_active)


def mor_flops_per_token(cfg, vocab_size: int, fractions=None) -> float:
    m, mor = cfg.model, cfg.model.mor
    _, active = mor_parameter_counts(cfg, vocab_size, fractions)
    S, heads = m.seq_length, m.num_attention_heads
    d = m.kv_channels or m.hidden_size // heads
    attention = 0.0
    for _, frac, step in _unrolled(cfg, fractions)[2]:
        k = frac * S
        shared_kv = mor.kv_sharing and step is not None and step > 0
        attention += 6 * heads * d * (k if shared_kv else k * k / S)
    return 6.0 * active + attention


def layer_flops(matmul_params: int, attn_width: int, k: float, seq_len: int,
                shared_kv: bool = False) -> float:
    """Training FLOPs of one unrolled layer on one sequence of which k tokens run it: 6·P·k for
    the matmuls (∝ k_r) plus 6·(h·d)·k² for attention among the k tokens (∝ k_r²;
    6·(h·d)·k·S with recursive KV sharing). `attn_width` = h·d (heads × head dim)."""
    return 6.0 * matmul_params * k + 6.0 * attn_width * (k * seq_len if shared_kv else k * k)


def predicted_block_ratio(matmul_params: int, attn_width: int, seq_len: int,
                          kept: list[float]) -> float:
    """FLOPs of a recursion block whose step r runs kept[r] tokens of each sequence, over the
    same block running all S tokens at every step (the shared layers per step cancel)."""
    block = sum(layer_flops(matmul_params, attn_width, k, seq_len) for k in kept)
    return block / (len(kept) * layer_flops(matmul_params, attn_width, seq_len, seq_len))


def step_kept(cfg) -> list[float]:
    """k_r: tokens of a sequence that run recursion step r (expected count for token-choice)."""
    return [f * cfg.model.seq_length for f in step_fractions(cfg)]


def mor_flops_by_step(cfg, vocab_size: int, fractions=None) -> dict[str, float]:
    """Training FLOPs per token of the sequence split into the recursion steps' shared layers
    ("step r", r = 1..N_r) and everything else ("outside", embedding, unique layers, depth
    routers); the values sum to `mor_flops_per_token`."""
    from megamoe.specs.accounting import layer_parameters

    m, mor = cfg.model, cfg.model.mor
    S, heads = m.seq_length, m.num_attention_heads
    width = heads * (m.kv_channels or m.hidden_size // heads)
    _, moe_slots, rows = _unrolled(cfg, fractions)
    lora = sum(lora_adapter_size(cfg, t) for t in mor.lora_targets)   # 0 when lora_rank = 0
    steps = [0.0] * mor.num_recursions
    for slot, frac, step in rows:
        if step is not None:
            shared_kv = mor.kv_sharing and step > 0
            steps[step] += layer_flops(layer_parameters(cfg, slot in moe_slots)[1] + lora, width,
                                       frac * S, S, shared_kv) / S
    total = mor_flops_per_token(cfg, vocab_size, fractions)
    return {"outside": total - sum(steps), **{f"step {r + 1}": f for r, f in enumerate(steps)}}


def mor_flops_by_unit(cfg, vocab_size: int) -> dict[str, float]:
    """Training FLOPs per token of the sequence of each pipeline unit (stages.py): "first" and
    "last" (the unique layers, Middle-* only), "block" (every recursion step's shared layers with
    k_r tokens, and the depth router) and "head" (final norm and output layer, 6·(D·V + D); the
    loss is not counted). With the input embedding, which `mor_flops_per_token` counts as a
    matmul (6·D·V unless tied to the head) but is a lookup, they sum to `mor_flops_per_token`."""
    from megamoe.specs.accounting import layer_parameters

    m = cfg.model
    S, heads = m.seq_length, m.num_attention_heads
    width = heads * (m.kv_channels or m.hidden_size // heads)
    plan, moe_slots, _ = _unrolled(cfg)
    steps = mor_flops_by_step(cfg, vocab_size)
    units = {"block": sum(v for k, v in steps.items() if k != "outside")
             + 6.0 * router_parameters(cfg)[1]}
    for name, slot in (("first", plan.first_unique), ("last", plan.last_unique)):
        if slot is not None:
            units[name] = layer_flops(layer_parameters(cfg, slot in moe_slots)[1], width,
                                      S, S) / S
    units["head"] = 6.0 * (vocab_size * m.hidden_size + m.hidden_size)
    return units
