"""Pipeline stages of a Mixture-of-Recursions model: which decoder units each stage holds.

The decoder's units, in order: the unique first layer ("first"), the recursion block ("block":
the shared pool applied N_r times with its depth router) and the unique last layer ("last");
Cycle / Sequence have the block only. A recursion block is never split over stages: its steps
share weights (tying them across stages would need a gradient reduction like shared
embeddings) and each step's router selects among the previous step's tokens.

Rule: every stage gets at least one unit, units stay in order (contiguous), and the split
minimises the largest stage's training FLOPs per token (`accounting.mor_flops_by_unit`: step r
costs ∝ k_r in the matmuls and ∝ k_r² in attention, so a block of small capacities weighs less
than N_r·K layers). The first stage also holds the embedding (a lookup: no FLOPs counted), the
last one the final norm and output layer ("head", 6·(D·V + D) per token). Ties go to the split
whose cuts come first. More stages than units are refused (config/mor.py: parallel.pipeline);
filling more stages would need several recursion blocks in one model.
"""

from __future__ import annotations

from itertools import combinations

UNITS = ("first", "block", "last")


def decoder_units(sharing: str) -> tuple[str, ...]:
    """The units of a sharing strategy's decoder: Middle-* keep the first and last layer unique."""
    return UNITS if sharing.startswith("middle") else ("block",)


def balance(costs: list[float], stages: int) -> list[int]:
    """Sizes of `stages` contiguous, non-empty groups of `costs` minimising the largest group's
    sum (exhaustive over the cut points: a decoder has at most three units)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"{stages} pipeline stages for {n} units: each stage needs one")
    best, best_load = None, float("inf")
    for cuts in combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        load = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        if load < best_load:
            best, best_load = bounds, load
    return [b - a for a, b in zip(best, best[1:])]


def unit_costs(cfg, vocab_size: int) -> dict[str, float]:
    """Training FLOPs per token of each unit, the head counted with the last unit."""
    from megamoe.mor.accounting import mor_flops_by_unit

    flops = mor_flops_by_unit(cfg, vocab_size)
    units = decoder_units(cfg.model.mor.sharing)
    costs = {u: flops[u] for u in units}
    costs[units[-1]] += flops["head"]
    return costs


def stage_units(cfg, vocab_size: int, stages: int) -> list[tuple[str, ...]]:
    """The units of each pipeline stage (the rule in the module docstring)."""
    costs = unit_costs(cfg, vocab_size)
    units = list(costs)
    sizes = balance(list(costs.values()), stages)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [tuple(units[s:s + n]) for s, n in zip(starts, sizes)]
