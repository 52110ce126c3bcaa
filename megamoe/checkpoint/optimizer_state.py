"""Optimizer state as global tensors, so it reshards like the model.

Megatron's optimizer checkpoint is tied to how its ChainedOptimizer splits parameters (dense vs
expert), which depends on the layout: one process has one sub-optimizer where EP2 has two, and
the keys and group structure differ. megamoe saves each per-parameter state tensor (Adam's
`exp_avg`, `exp_avg_sq`; the fp32 master weight under bf16) under the parameter's global
checkpoint key, sharded exactly like the parameter, plus the step count; any layout loads it.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from megamoe.models.global_view import parameter_shards

STATE_NAMES = ("exp_avg", "exp_avg_sq")


def _sub_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def main_params(optimizer) -> dict:
    """{model parameter: the parameter the inner torch optimizer updates}."""
    pairs = {}
    for sub in _sub_optimizers(optimizer):
        if hasattr(sub, "float16_groups"):
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


def sharded_optimizer_state(engine, step: int) -> dict:
    """{unique id: ShardedTensor} of every state tensor, keyed `optimizer.<name>.<param key>`;
    empty for optimizers without per-parameter state (plain SGD)."""
    opt = engine.optimizer
    pairs = main_params(opt)
    if engine.cfg.train.optimizer != "adamw":
        return {}
    ensure_state(opt, step)
    names = list(STATE_NAMES)
    if any(m is not p for p, m in pairs.items()):
        names.append("main_param")
    out = {}
    for name in names:
        def tensor_of(p, name=name):
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
def copy_loaded(targets: dict, loaded: dict) -> None:
    """Copy what dist_checkpointing loaded into the optimizer's own tensors (the targets'
    data are views of them)."""
    for uid, sh in targets.items():
        sh.data.copy_(loaded[uid].reshape(sh.data.shape))
