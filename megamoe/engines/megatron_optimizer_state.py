"""Optimizer state as global tensors, so it reshards like the model.

Megatron's optimizer checkpoint is tied to how its ChainedOptimizer splits parameters (dense vs
expert), which depends on the layout: one process has one sub-optimizer where EP2 has two, and
the keys and group structure differ. megamoe saves each per-parameter state tensor (Adam's
`exp_avg`, `exp_avg_sq`; the fp32 master weight under bf16) under the parameter's global
checkpoint key, sharded exactly like the parameter, plus the step count; any layout loads it.

Distributed optimizer: each data-parallel rank holds the state of a slice of every flattened
parameter. Saving first assembles the full state per parameter over the parameter's DP group
(an all-reduce of zero-padded slices), which costs the memory of the non-distributed state for
the duration of the save; loading takes each rank's slice back. This replaces Megatron's own
distributed-optimizer formats, which fail on CPU (DESIGN.md).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from megamoe.models.global_view import parameter_shards

STATE_NAMES = ("exp_avg", "exp_avg_sq")


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _is_distributed(sub) -> bool:
    return hasattr(sub, "shard_fp32_groups")


def shard_ranges(optimizer) -> dict:
    """{model parameter: (start, end) of its flattened elements this rank's distributed
    optimizer owns}; empty for non-distributed optimizers."""
    ranges = {}
    for sub in _sub_optimizers(optimizer):
        if _is_distributed(sub):
            for group in (*sub.model_float16_groups, *sub.model_fp32_groups):
                for p in group:
                    r = sub._get_model_param_range_map(p)["param"]
                    ranges[p] = (r.start, r.end)
    return ranges


def main_params(optimizer) -> dict:
    """{model parameter: the parameter the inner torch optimizer updates} (under the
    distributed optimizer: this rank's flat shard of it)."""
    pairs = {}
    for sub in _sub_optimizers(optimizer):
        if _is_distributed(sub):
            for models, shards in ((sub.model_float16_groups, sub.shard_fp32_from_float16_groups),
                                   (sub.model_fp32_groups, sub.shard_fp32_groups)):
                for model_group, shard_group in zip(models, shards):
                    pairs.update(zip(model_group, shard_group))
        elif hasattr(sub, "float16_groups"):
            for model_group, main_group in zip(sub.float16_groups, sub.fp32_from_float16_groups):
                pairs.update(zip(model_group, main_group))
            for group in sub.fp32_from_fp32_groups:
                pairs.update({p: p for p in group})
        else:
            for group in sub.optimizer.param_groups:
                pairs.update({p: p for p in group["params"]})
    return pairs


def _inner_state(optimizer, main) -> dict:
    for sub in _sub_optimizers(optimizer):
        if main in sub.optimizer.state or any(main is p for g in sub.optimizer.param_groups
                                              for p in g["params"]):
            return sub.optimizer.state.setdefault(main, {})
    raise AssertionError("parameter not owned by any sub-optimizer")


def ensure_state(optimizer, step: int) -> None:
    """Create Adam state for every parameter (torch creates it lazily at the first step)."""
    for main in main_params(optimizer).values():
        state = _inner_state(optimizer, main)
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(main, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(main, memory_format=torch.preserve_format)
        state["step"] = torch.tensor(float(step))


@contextlib.contextmanager
def _as_data(chunks, tensor_of):
    saved = []
    for c in chunks:
        for p in c.parameters():
            t = tensor_of(p)
            if t is None:
                continue
            saved.append((p, p.data))
            p.data = t.view_as(p.data) if t.dtype == p.dtype else t.view(p.data.shape)
    try:
        yield
    finally:
        for p, data in saved:
            p.data = data


def _dp_groups(engine) -> dict:
    """{model parameter: the data-parallel group its gradient buffer reduces over}."""
    groups = {}
    for chunk in engine.chunks:
        for buf in (*getattr(chunk, "buffers", []), *getattr(chunk, "expert_parallel_buffers", [])):
            groups.update({p: buf.data_parallel_group for p in buf.params})
    return groups


def _full_states(engine, names, pairs, ranges, assemble: bool = True) -> dict:
    """{name: {model param: full-size state}} assembled from the distributed optimizer's slices
    (zeros to load into when not `assemble`)."""
    import torch.distributed as dist

    groups = _dp_groups(engine)
    full = {name: {} for name in names}
    for chunk in engine.modules:
        for p in chunk.parameters():
            for name in names:
                t = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                full[name][p] = t.view(p.shape)
                if not assemble:
                    continue
                if p in ranges:
                    start, end = ranges[p]
                    main = pairs[p]
                    src = main.data if name == "main_param" else _inner_state(engine.optimizer,
                                                                              main)[name]
                    t[start:end] = src.detach().reshape(-1).float()
                dist.all_reduce(t, group=groups[p])
    return full


def sharded_optimizer_state(engine, step: int, is_loading: bool = False) -> dict:
    """{unique id: ShardedTensor} of every state tensor, keyed `optimizer.<name>.<param key>`;
    empty for optimizers without per-parameter state (plain SGD). Under the distributed
    optimizer the tensors are full-size buffers: assembled over DP for saving; for loading, zero
    buffers that `copy_loaded` then slices into this rank's shards."""
    opt = engine.optimizer
    if engine.cfg.train.optimizer != "adamw":
        return {}
    pairs, ranges = main_params(opt), shard_ranges(opt)
    ensure_state(opt, step)
    names = list(STATE_NAMES)
    if any(m is not p for p, m in pairs.items()) and not (ranges and all(
            p.dtype == torch.float32 for p in pairs)):
        names.append("main_param")
    full = _full_states(engine, names, pairs, ranges, assemble=not is_loading) if ranges else None
    if is_loading:
        engine._optimizer_full_state = full      # the buffers copy_loaded slices from
    out = {}
    for name in names:
        def tensor_of(p, name=name):
            if full is not None:
                return full[name].get(p)
            main = pairs.get(p)
            if main is None:
                return None
            return main.data if name == "main_param" else _inner_state(opt, main)[name]

        with _as_data(engine.modules, tensor_of):
            for i, sh in enumerate(parameter_shards(engine.modules)):
                # detach() pins the state tensor: sh.data may be the Parameter itself, whose
                # .data goes back to the weights when the context exits
                out[f"{name}/{i}"] = dataclasses.replace(sh, key=f"optimizer.{name}.{sh.key}",
                                                         data=sh.data.detach())
    return out


@torch.no_grad()
def copy_loaded(targets: dict, loaded: dict, engine=None) -> None:
    """Copy what dist_checkpointing loaded into the optimizer's own tensors (the targets'
    data are views of them, or of full-size buffers under the distributed optimizer, whose
    slices then go to this rank's shards)."""
    for uid, sh in targets.items():
        sh.data.copy_(loaded[uid].reshape(sh.data.shape))
    full = getattr(engine, "_optimizer_full_state", None) if engine is not None else None
    if not full:
        return
    pairs, ranges = main_params(engine.optimizer), shard_ranges(engine.optimizer)
    for name, per_param in full.items():
        for p, t in per_param.items():
            if p not in ranges:
                continue
            start, end = ranges[p]
            main = pairs[p]
            dst = main.data if name == "main_param" else _inner_state(engine.optimizer, main)[name]
            dst.copy_(t.reshape(-1)[start:end].view_as(dst))
    engine._optimizer_full_state = None
