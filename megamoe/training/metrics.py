"""Numbers a training run reports: global loss, expert-load imbalance, parameter counts, FLOPs."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.models.specs.gpt_moe import moe_layer_pattern


def global_loss(stats: dict) -> float:
    """Mean token loss of the global batch: summed once per (DP rank, micro-batch) by the ranks
    that hold it (last pipeline stage, TP rank 0)."""
    from megatron.core import parallel_state as ps

    owner = (ps.is_pipeline_last_stage(ignore_virtual=True)
             and ps.get_tensor_model_parallel_rank() == 0)
    t = torch.tensor([stats["loss_sum"], stats["tokens"]], dtype=torch.float64) * float(owner)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return (t[0] / t[1].clamp(min=1)).item()


def expert_load(layers, num_layers: int, num_experts: int, reset: bool = True) -> torch.Tensor:
    """[L, E] routed-token counts of the MoE `layers` since the last reset, summed over all
    ranks."""
    load = torch.zeros(num_layers, max(num_experts, 1), dtype=torch.float64)
    for layer in layers:
        load[layer.layer_number - 1] += layer.tokens_per_expert_acc.double().cpu()
        if reset:
            layer.tokens_per_expert_acc.zero_()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(load)
    return load


def routing_stats(layers) -> dict:
    """Router statistics since the last read (`RouterOutput.stats`: dropped fraction, entropy,
    thresholds, family losses), averaged over MoE layers, micro-batches and ranks. Ranks first
    agree on the names (pipeline stages may hold different families' layers, or none)."""
    local = {}
    for layer in layers:
        for name, (total, count) in layer.stats_acc.items():
            acc = local.setdefault(name, [0.0, 0])
            acc[0], acc[1] = acc[0] + total, acc[1] + count
        layer.stats_acc.clear()
    names = sorted(local)
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, names)
        names = sorted({n for part in every for n in part})
    sums = torch.tensor([local.get(n, [0.0, 0]) for n in names], dtype=torch.float64)
    if names and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    return {f"router/{n}": (sums[i, 0] / sums[i, 1]).item()
            for i, n in enumerate(names) if sums[i, 1] > 0}


def imbalance(load_LE: torch.Tensor) -> float:
    """Mean over MoE layers of max-load / mean-load (1.0 = perfectly balanced)."""
    rows = load_LE[load_LE.sum(-1) > 0]
    if rows.numel() == 0:
        return 1.0
    return (rows.max(-1).values / rows.mean(-1)).mean().item()


def parameter_counts(cfg, vocab_size: int) -> tuple[int, int]:
    """(total, active per token) parameters of the model described by `cfg`."""
    if cfg.model.mor.enabled:    # shared pool, tokens at each recursion depth
        from megamoe.mor.accounting import mor_parameter_counts
        return mor_parameter_counts(cfg, vocab_size)
    total = active = embedding_parameters(cfg, vocab_size)
    for is_moe in moe_layer_pattern(cfg.model.num_layers, cfg.model.moe.layer_freq,
                                    cfg.model.moe.num_experts):
        layer_total, layer_active = layer_parameters(cfg, is_moe, vocab_size)
        total += layer_total
        active += layer_active
    return total, active


def embedding_parameters(cfg, vocab_size: int) -> int:
    """Input embedding, output layer (unless tied) and the final norm."""
    m = cfg.model
    return vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2) + m.hidden_size


def layer_parameters(cfg, is_moe: bool, vocab_size: int = 0) -> tuple[int, int]:
    """(total, active per token) parameters of one decoder layer (MoE: with the router
    family's own parameters, `MegamoeRouter.extra_parameters`)."""
    m, moe = cfg.model, cfg.model.moe
    h = m.hidden_size
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    d = m.kv_channels or h // heads
    attn = h * (heads * d + 2 * groups * d) + heads * d * h + 2 * h
    if m.add_qkv_bias:
        attn += heads * d + 2 * groups * d
    if m.qk_layernorm:
        attn += 2 * d
    dense = 3 * h * m.ffn_hidden_size
    expert = 3 * h * moe.ffn_hidden_size
    shared = 3 * h * moe.shared_expert_ffn_hidden_size + (h if moe.shared_expert_gate else 0)
    if is_moe:
        from megamoe.moe.routers import ROUTERS

        extra_total, extra_active = ROUTERS[moe.router].extra_parameters(moe, h, vocab_size)
        return (attn + moe.num_experts * h + moe.num_experts * expert + shared + extra_total,
                attn + moe.num_experts * h + moe.topk * expert + shared + extra_active)
    return attn + dense, attn + dense


def flops_per_token(cfg, vocab_size: int) -> float:
    """Training FLOPs per token: 6 × active matmul parameters + causal attention scores."""
    if cfg.model.mor.enabled:    # capacities shrink both terms per recursion step
        from megamoe.mor.accounting import mor_flops_per_token
        return mor_flops_per_token(cfg, vocab_size)
    _, active = parameter_counts(cfg, vocab_size)
    m = cfg.model
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    attention = 6 * m.num_layers * m.seq_length * m.num_attention_heads * d  # QKᵀ and AV, causal
    return 6.0 * active + attention


def router_losses(cfg, pg, num_microbatches: int) -> dict:
    """Mean per-layer router losses of the last step (Switch load-balancing loss and z-loss,
    without their coefficients), read from Megatron's tracker and reduced over ranks."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    moe = cfg.model.moe
    aux_name = {"switch": "load_balancing_loss", "sequence": "seq_load_balancing_loss",
                "global": "global_load_balancing_loss"}[moe.aux_loss_type]
    names = [n for n, c in ((aux_name, moe.aux_loss_coeff), ("z_loss", moe.z_loss_coeff))
             if moe.num_experts and c]
    if not names:
        return {}
    tracker = get_moe_layer_wise_logging_tracker()
    for name in names:   # every rank reduces the same names, also stages without MoE layers
        if name not in tracker:
            tracker[name] = {"values": torch.zeros(cfg.model.num_layers), "reduce_group": None,
                             "avg_group": None, "reduce_group_has_dp": False}
    reduce_aux_losses_tracker_across_ranks(names, pg_collection=pg)
    n_moe = max(1, sum(moe_layer_pattern(cfg.model.num_layers, moe.layer_freq, moe.num_experts)))
    out = {name: tracker[name]["values"].sum().item() / num_microbatches / n_moe
           for name in names}
    clear_aux_losses_tracker()
    return out


class MoRDepthStats:
    """Depth statistics of the Mixture-of-Recursions blocks (megamoe.mor) since the last read.

    A forward hook on every `RecursionBlock` accumulates, per training-mode forward, the share of
    tokens that run each recursion step (from the block's `last_stats`: expert-choice
    `step_{r}_kept_fraction`, token-choice `depth_{i}_fraction`) and the expert-choice sampling
    accuracy. `read` averages over forwards and ranks (TP ranks hold equal values) and turns the
    shares into a histogram of token counts per depth d = recursion steps run (0..N_r). Under
    pipeline parallelism only the block's stage records; every rank reduces N_r rows."""

    def __init__(self, chunks, num_recursions: int):
        from megamoe.mor.block import RecursionBlock

        blocks = [m for c in chunks for m in c.modules() if isinstance(m, RecursionBlock)]
        self.num_recursions = num_recursions
        self.sums: dict[str, float] = {}
        self.count = 0
        self.handles = [b.register_forward_hook(self._record) for b in blocks]

    def _record(self, block, _inputs, _output) -> None:
        if not block.training:
            return
        s, R = block.last_stats, len(block.steps)
        if "step_0_kept_fraction" in s:          # expert-choice
            kept = [s[f"step_{r}_kept_fraction"] for r in range(R)]
        else:                                    # token-choice: step r runs depths ≥ r
            kept = [sum(s[f"depth_{i}_fraction"] for i in range(r, R)) for r in range(R)]
        values = {f"kept_step_{r + 1}": f for r, f in enumerate(kept)}
        values.update({f"sampling_acc_step_{r + 1}": s[f"step_{r}_sampling_acc"]
                       for r in range(R) if f"step_{r}_sampling_acc" in s})
        for name, v in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + v
        self.count += 1

    def read(self, tokens: int) -> dict:
        """{"mor/kept_step_r": share of tokens run at step r (r = 1..N_r), "mor/sampling_acc_step_r"
        (expert-choice), "mor/depth": [tokens of depth 0, …, N_r]} over `tokens`, the global
        batch's token count; the histogram sums to `tokens`. Resets the sums."""
        R = self.num_recursions
        names = [f"kept_step_{r + 1}" for r in range(R)]
        names += [f"sampling_acc_step_{r + 1}" for r in range(R)]
        t = torch.tensor([[self.sums.get(n, 0.0), float(self.count if n in self.sums else 0)]
                          for n in names], dtype=torch.float64)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        self.sums, self.count = {}, 0
        means = {n: (t[i, 0] / t[i, 1]).item() for i, n in enumerate(names) if t[i, 1] > 0}
        out = {f"mor/{n}": v for n, v in means.items()}
        # tokens with depth ≥ d, d = 0..N_r+1: the histogram telescopes to `tokens`
        at_least = [tokens] + [round(means.get(n, 0.0) * tokens) for n in names[:R]] + [0]
        out["mor/depth"] = [at_least[d] - at_least[d + 1] for d in range(R + 1)]
        return out
