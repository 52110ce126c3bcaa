"""The DeepSpeed engine's optimizer state as global tensors, keyed as the Megatron engine keys
them (megamoe.engines.megatron_optimizer_state): `optimizer.<name>.<param key>`, sharded like
the parameter, so either engine loads what the other saved, under any layout.

ZeRO 1/2 keep the state of flat fp32 partitions; DeepSpeed's `safe_get_full_optimizer_state` /
`safe_get_full_fp32_param` assemble one parameter's full tensor over its data-parallel group
(the expert-DP group for experts; a collective, called in the same order on every rank), and
the `safe_set_full_*` twins write this rank's fragment back.
"""

from __future__ import annotations

import dataclasses

import torch

from megamoe.engines.megatron_optimizer_state import STATE_NAMES
from megamoe.engines.megatron_optimizer_state import _as_data as as_data
from megamoe.models.global_view import parameter_shards


def _names(engine) -> list[str]:
    if engine.cfg.train.optimizer != "adamw":
        return []
    fp32 = all(p.dtype == torch.float32 for p in engine.modules[0].parameters())
    # as the Megatron engine: fp32 master weights are saved apart only under bf16 training
    return list(STATE_NAMES) + ([] if fp32 else ["main_param"])


def ensure_state(engine) -> None:
    """Create Adam's state of every flat partition (torch creates it at the first step) and
    (re)link DeepSpeed's per-parameter fragments to it: DeepSpeed links them once, right after
    stepping the first parameter group, when the other groups have no state yet."""
    zero = engine.optimizer
    for flat in zero.single_partition_of_fp32_groups:
        state = zero.optimizer.state[flat]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(flat)
            state["exp_avg_sq"] = torch.zeros_like(flat)
        state["step"] = torch.tensor(float(engine.step))
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()


def _full(param, name: str) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    if name == "main_param":
        return safe_get_full_fp32_param(param)
    return safe_get_full_optimizer_state(param, name)


def sharded_optimizer_state(engine, is_loading: bool = False) -> dict:
    """{unique id: ShardedTensor} of every per-parameter state tensor (empty for plain SGD).
    Saving: the full tensors, assembled over DP. Loading: zero buffers (kept on the engine)
    that `load_optimizer_state` hands to DeepSpeed once dist_checkpointing filled them."""
    names = _names(engine)
    if not names:
        return {}
    ensure_state(engine)
    params = [p for m in engine.modules for p in m.parameters()]
    full = {(name, p): (torch.zeros(p.shape, dtype=torch.float32) if is_loading
                        else _full(p, name).reshape(p.shape))
            for name in names for p in params}
    engine._optimizer_full_state = full if is_loading else None
    out = {}
    for name in names:
        with as_data(engine.modules, lambda p, name=name: full.get((name, p))):
            for i, sh in enumerate(parameter_shards(engine.modules)):
                # detach() pins the state tensor: sh.data may be the Parameter itself
                out[f"{name}/{i}"] = dataclasses.replace(sh, key=f"optimizer.{name}.{sh.key}",
                                                         data=sh.data.detach())
    return out


@torch.no_grad()
def load_optimizer_state(engine, targets: dict, loaded: dict) -> None:
    """Copy what dist_checkpointing loaded into the template's buffers (views of the full
    per-parameter buffers), then give each parameter's full state to DeepSpeed, which keeps
    this rank's fragment."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    for uid, sh in targets.items():
        sh.data.copy_(loaded[uid].reshape(sh.data.shape))
    for (name, p), buf in engine._optimizer_full_state.items():
        if name == "main_param":
            safe_set_full_fp32_param(p, buf)
        else:
            safe_set_full_optimizer_state(p, buf, name)
    engine._optimizer_full_state = None


@torch.no_grad()
def refresh_master_params(engine) -> None:
    """After the model weights were loaded in place, ZeRO's fp32 master partitions follow."""
    from deepspeed.utils import safe_set_full_fp32_param

    for p in engine.modules[0].parameters():
        safe_set_full_fp32_param(p, p.data.float())
