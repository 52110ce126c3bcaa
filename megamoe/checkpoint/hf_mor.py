"""Mixture-of-Recursions in megamoe's remote-code Hugging Face family: the `model.mor` section ⇄
config.json's `mor` object (hf_remote/configuration_megamoe.py, run by hf_remote/mor_megamoe.py).

Every `model.mor` field that changes inference travels, with megamoe's defaults resolved (α,
the capacities C_r), so that the folder does not depend on this megamoe's defaults; the
training-only fields travel under `mor.training` so that an import trains as the run did. A
field of `model.mor` (or `model.mor.token`) listed in neither set is refused when it is not at
its default: it may change inference, and the remote code would silently ignore it.
Per-recursion LoRA (`lora_rank` > 0) travels as `lora_rank`, `lora_alpha` (resolved: null
means 2·rank) and `lora_targets`; `lora_dropout` only trains (`mor.training`). A folder without
these keys (written before LoRA exported) has no adapters.
Tensor names: hf_layout (MOR_ROUTER, MOR_LORA, `DecoderShape.layer_prefixes`).
"""

from __future__ import annotations

import dataclasses
import json

# model.mor fields → config.json `mor` keys (those that change inference)
INFERENCE = ("num_recursions", "sharing", "router", "capacities", "alpha", "temperature",
             "inference_rule", "gating", "kv_sharing")
TOKEN_INFERENCE = ("score", "balancing")                 # model.mor.token → token_<name>
LORA = ("lora_rank", "lora_alpha", "lora_targets")     # change inference; optional keys
TRAINING = ("aux_loss_coeff", "z_loss_coeff", "allow_non_causal", "lora_dropout")
TOKEN_TRAINING = ("balance_coeff", "bias_rate")


def enabled(cfg) -> bool:
    mor = getattr(cfg.model, "mor", None)
    return mor is not None and mor.enabled


def problems(cfg) -> list[str]:
    """The `model.mor` fields the export does not know, where they are not at their default."""
    if not enabled(cfg):
        return []
    mor = cfg.model.mor
    bad = []
    for section, known, prefix in ((mor, {"enabled", "token", *INFERENCE, *LORA, *TRAINING},
                                    "model.mor"),
                                   (mor.token, {*TOKEN_INFERENCE, *TOKEN_TRAINING},
                                    "model.mor.token")):
        defaults = type(section)()
        for f in dataclasses.fields(section):
            if f.name not in known and getattr(section, f.name) != getattr(defaults, f.name):
                bad.append(f"{prefix}.{f.name}: {getattr(section, f.name)!r}; the Hugging Face "
                           "export does not know this option (it may change inference)")
    return bad


def hf_fields(cfg) -> dict:
    """config.json's `mor` object (None: not a MoR model)."""
    if not enabled(cfg):
        return {"mor": None}
    from megamoe.mor.expert_choice import capacity_schedule

    mor = cfg.model.mor
    fields = {name: getattr(mor, name) for name in INFERENCE}
    fields["alpha"] = mor.resolved_alpha()
    fields["capacities"] = ([float(c) for c in mor.capacities or
                             capacity_schedule(mor.num_recursions)]
                            if mor.router == "expert" else None)
    fields["temperature"] = float(mor.temperature)
    fields.update({f"token_{name}": getattr(mor.token, name) for name in TOKEN_INFERENCE})
    fields.update(lora_fields(mor))
    fields["training"] = {**{name: getattr(mor, name) for name in TRAINING},
                          **{f"token_{name}": getattr(mor.token, name)
                             for name in TOKEN_TRAINING}}
    return {"mor": fields}


def lora_fields(mor) -> dict:
    """`lora_rank`, `lora_alpha` (resolved; null without adapters) and `lora_targets`."""
    return {"lora_rank": int(mor.lora_rank), "lora_alpha": mor.resolved_lora_alpha(),
            "lora_targets": list(mor.lora_targets)}


def overrides(mor: dict) -> list[str]:
    """megamoe overrides for config.json's `mor` object."""
    out = ["model.mor.enabled=true"]
    for name in INFERENCE:
        if name == "capacities" and mor["router"] != "expert":
            continue
        out.append(f"model.mor.{name}={json.dumps(mor[name])}")
    out += [f"model.mor.token.{name}={json.dumps(mor['token_' + name])}"
            for name in TOKEN_INFERENCE]
    out += [f"model.mor.{name}={json.dumps(mor[name])}" for name in LORA if name in mor]
    training = dict(mor.get("training") or {})
    if mor["router"] == "expert":
        training.setdefault("allow_non_causal", True)     # it was trained so
    for name, value in training.items():
        section = "model.mor.token." if name.startswith("token_") else "model.mor."
        out.append(f"{section}{name.removeprefix('token_')}={json.dumps(value)}")
    return out


def router_buffers(cfg) -> tuple[str, ...]:
    """Global keys of the depth router's persistent buffers (megamoe.checkpoint.router_state)."""
    if enabled(cfg) and cfg.model.mor.router == "token":
        return ("decoder.recursion.router.router_bias",)
    return ()
