"""Numbers a training run reports: global loss, expert-load imbalance, parameter counts, FLOPs."""

from __future__ import annotations

import torch
import torch.distributed as dist

from megamoe.launch.env import collective_device
from megamoe.specs.gpt_moe import moe_layer_pattern


def _all_reduce(t: torch.Tensor) -> None:
    """Sum a host tensor over all ranks in place, through the backend's device (NCCL rejects
    CPU tensors)."""
    on = t.to(collective_device())
    dist.all_reduce(on)
    t.copy_(on)


def global_loss(stats: dict, pg) -> float:
    """Mean loss per unit (token or sample) of the global batch: summed once per (DP rank,
    micro-batch) by the ranks that hold it (last pipeline stage, TP rank 0 of the grid `pg`)."""
    return global_mean(stats, pg, "loss_sum")


def global_mean(stats: dict, pg, name: str, per: str = "units") -> float:
    """The global batch's sum of stat `name` per `per` (`global_loss`'s rule: each (DP rank,
    micro-batch) counted once), e.g. `correct` per image: the accuracy."""
    owner = pg.pp.rank() == pg.pp.size() - 1 and pg.tp.rank() == 0
    t = torch.tensor([stats[name], stats[per]], dtype=torch.float64) * float(owner)
    if dist.is_initialized() and dist.get_world_size() > 1:
        _all_reduce(t)
    return (t[0] / t[1].clamp(min=1)).item()


def data_counts(counts: dict, pg) -> dict:
    """The loader's counts (bad samples since the start) summed over the DP ranks, each
    counted once (the ranks `global_mean` takes its sums from); {} when it counts nothing."""
    if not counts:
        return {}
    owner = pg.pp.rank() == pg.pp.size() - 1 and pg.tp.rank() == 0
    t = torch.tensor([float(v) for v in counts.values()], dtype=torch.float64) * float(owner)
    if dist.is_initialized() and dist.get_world_size() > 1:
        _all_reduce(t)
    return {k: int(v) for k, v in zip(counts, t.tolist())}


def moe_streams(layers) -> dict:
    """{stream: (its layer count, its MoE layers' numbers)} of the model's MoE stacks other than
    the main one (a vlm encoder's: megamoe.moe.layer), the same on every rank (pipeline stages
    hold other layers). One collective: read it once per run."""
    mine: dict = {}
    for layer in layers:
        if layer.stream:
            n, numbers = mine.get(layer.stream, (layer.config.num_layers, ()))
            mine[layer.stream] = (n, numbers + (layer.layer_number,))
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        mine = {}
        for part in every:
            for stream, (n, numbers) in part.items():
                mine[stream] = (n, tuple(sorted(set(mine.get(stream, (n, ()))[1] + numbers))))
    return dict(sorted(mine.items()))


def expert_load(layers, num_layers: int, num_experts: int, reset: bool = True,
                streams: dict | None = None) -> dict:
    """{layer: [E] routed-token counts} of the MoE `layers` since the last reset, summed over
    all ranks, for every layer of the main stack (key: its 1-based number) and of each stream
    in `streams` (`moe_streams`; key "<stream>_layer<N>")."""
    offsets, keys = {"": 0}, list(range(1, num_layers + 1))
    for stream, (n, _) in (streams or {}).items():
        offsets[stream] = len(keys)
        keys += [f"{stream}_layer{i}" for i in range(1, n + 1)]
    load = torch.zeros(len(keys), max(num_experts, 1), dtype=torch.float64)
    for layer in layers:
        load[offsets[layer.stream] + layer.layer_number - 1] += \
            layer.tokens_per_expert_acc.double().cpu()
        if reset:
            layer.tokens_per_expert_acc.zero_()
    if dist.is_initialized() and dist.get_world_size() > 1:
        _all_reduce(load)
    return dict(zip(keys, load))


def routing_stats(layers) -> dict:
    """Router statistics since the last read (`RouterOutput.stats`: dropped fraction, entropy,
    thresholds, family losses), averaged over MoE layers, micro-batches and ranks; another
    stream's layers (a vlm encoder's) under "router/<stream>/<name>". Ranks first agree on the
    names (pipeline stages may hold different families' layers, or none)."""
    local = {}
    for layer in layers:
        for name, (total, count) in layer.stats_acc.items():
            acc = local.setdefault(f"{layer.stream}/{name}" if layer.stream else name, [0.0, 0])
            acc[0], acc[1] = acc[0] + total, acc[1] + count
        layer.stats_acc.clear()
    names = sorted(local)
    if dist.is_initialized() and dist.get_world_size() > 1:
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, names)
        names = sorted({n for part in every for n in part})
    sums = torch.tensor([local.get(n, [0.0, 0]) for n in names], dtype=torch.float64)
    if names and dist.is_initialized() and dist.get_world_size() > 1:
        _all_reduce(sums)
    return {f"router/{n}": (sums[i, 0] / sums[i, 1]).item()
            for i, n in enumerate(names) if sums[i, 1] > 0}


def fp8_counters(layers, num_layers: int, streams: dict | None = None) -> dict:
    """FP8 casts that saturated (overflow) or flushed a nonzero value to zero (underflow) since
    the last read, per MoE layer (1-based; another stream's, from `moe_streams`, as
    "<stream>_layer<N>"), summed over all ranks; layers without FP8 experts report nothing."""
    offsets, names = {"": 0}, [f"layer{i}" for i in range(1, num_layers + 1)]
    for stream, (n, _) in (streams or {}).items():
        offsets[stream] = len(names)
        names += [f"{stream}_layer{i}" for i in range(1, n + 1)]
    counts_L3 = torch.zeros(len(names), 3, dtype=torch.float64)   # overflow, underflow, is FP8
    for layer in layers:
        read = getattr(layer.experts, "fp8_counters", None)
        if read is not None:
            c = read()
            counts_L3[offsets[layer.stream] + layer.layer_number - 1] += torch.tensor(
                [c["fp8_overflow"], c["fp8_underflow"], 1.0], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts_L3)
    out = {}
    for name, (over, under, is_fp8) in zip(names, counts_L3.tolist()):
        if is_fp8:
            out[f"fp8/overflow_{name}"] = int(over)
            out[f"fp8/underflow_{name}"] = int(under)
    return out


def imbalance(load: dict) -> float:
    """Mean over MoE layers (`expert_load`'s rows) of max-load / mean-load (1.0 = perfectly
    balanced)."""
    if not load:
        return 1.0
    load_LE = torch.stack(list(load.values()))
    rows = load_LE[load_LE.sum(-1) > 0]
    if rows.numel() == 0:
        return 1.0
    return (rows.max(-1).values / rows.mean(-1)).mean().item()


def router_losses(cfg, pg, num_microbatches: int, streams: dict | None = None) -> dict:
    """Mean per-layer router losses of the last step (Switch load-balancing loss and z-loss,
    without their coefficients), read from Megatron's tracker and reduced over ranks; those of
    each stream in `streams` (`moe_streams`: an encoder's MoE layers, tracked under
    "<stream>/<name>", megamoe.moe.routers.base) as "<stream>/<name>", and per layer as
    "<stream>/layer<N>/<name>"."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    moe = cfg.model.moe
    aux_name = {"switch": "load_balancing_loss", "sequence": "seq_load_balancing_loss",
                "global": "global_load_balancing_loss"}[moe.aux_loss_type]
    base = [n for n, c in ((aux_name, moe.aux_loss_coeff), ("z_loss", moe.z_loss_coeff))
            if moe.num_experts and c]
    if not base:
        return {}
    pattern = moe_layer_pattern(cfg.model.num_layers, moe.layer_freq, moe.num_experts)
    main = (cfg.model.num_layers, tuple(i + 1 for i, is_moe in enumerate(pattern) if is_moe))
    layers = {name: main for name in base}
    for stream, stream_layers in (streams or {}).items():
        layers.update({f"{stream}/{name}": stream_layers for name in base})
    names = list(layers)
    tracker = get_moe_layer_wise_logging_tracker()
    for name in names:   # every rank reduces the same names, also stages without MoE layers
        if name not in tracker:
            tracker[name] = {"values": torch.zeros(layers[name][0]), "reduce_group": None,
                             "avg_group": None, "reduce_group_has_dp": False}
    reduce_aux_losses_tracker_across_ranks(names, pg_collection=pg)
    out = {}
    for name in names:
        values_L = tracker[name]["values"] / num_microbatches
        out[name] = values_L.sum().item() / max(1, len(layers[name][1]))
        if "/" in name:                   # another stream's: also per layer
            stream, _, base_name = name.partition("/")
            out.update({f"{stream}/layer{n}/{base_name}": values_L[n - 1].item()
                        for n in layers[name][1]})
    clear_aux_losses_tracker()
    return out
