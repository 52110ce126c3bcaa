"""megamoe's own Hugging Face family (model_type "megamoe"): the folder carries its modeling
code (`hf_remote/`, copied in and named by `auto_map`), so transformers runs any megamoe decoder
with `trust_remote_code=True` — sigmoid scores, QK-norm with a shared expert, an ungated shared
expert, qkv bias with QK-norm, unrenormalised top k, dense models, and every router family of
megamoe.moe.routers with its eval-mode routing (`hf_remote/routers_megamoe.py`).

Tensors are named as in Qwen2/3-MoE (`mlp.gate`, `self_attn.q_norm`, `mlp.shared_expert…`),
experts fused ([E, 2F, D] `experts.gate_up_proj`, [E, D, F] `experts.down_proj`): the code has
no per-expert modules to load them into. Every other router tensor, parameter or persistent
buffer (`mlp.router.<name>`: Diff-MoE's `timestep_weight` and `calibration.*`, Soft MoE's
`l2_norm.weight`, the loss-free `selection_bias`, Expert Race's `threshold_ema` and PLR's
`plr_hidden`/`plr_target`, …) is `mlp.gate.<name>`; the family's option sections travel in
config.json (`router_options`). Megatron's token dropping (`model.moe.capacity_factor`,
`drop_policy`, `pad_to_capacity`) travels as `capacity_factor`, `token_drop_policy` and
`pad_to_capacity` (absent when dropless); the remote code drops over the tokens of a call
(in a MoR step over its active tokens, in the order of megamoe's compacted batch).

Mixture-of-Recursions decoders (`model.mor.enabled`) export too: config.json's `mor` object
(hf_mor), the unique layers as `model.layers.{0,1}`, the shared pool as
`model.recursion.layers.{j}` and the depth router as `model.recursion.router.*` (hf_layout);
`hf_remote/mor_megamoe.py` runs the recursion block in megamoe's eval mode, with the
per-recursion LoRA adapters as `model.recursion.lora.*` (hf_layout, hf_mor).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

from megamoe.checkpoint import hf_mor
from megamoe.checkpoint.hf_fields import (
    layer_freq_override, modality_norm_problem, renormalize, renormalize_overrides, rope_theta,
)
from megamoe.checkpoint.hf_layout import DENSE, DecoderShape, Names, mor_stored_layers

MODEL_TYPE = "megamoe"
NAMES = Names(moe_block="mlp", expert=DENSE, fused_experts=True, router_state=True)
CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_remote")
CODE_FILES = ("configuration_megamoe.py", "modeling_megamoe.py", "routers_megamoe.py",
              "mor_megamoe.py")
# model.moe.<section>s a router family reads (config.json `router_options`)
SECTIONS = {"dit_moe": ("dit_moe",), "diff_moe": ("diff_moe",), "vmoe": ("vmoe",),
            "limoe": ("vmoe", "limoe"), "race": ("race",), "modality": ("modality",),
            "soft": ("soft",), "diffmoe": ("diffmoe",)}
RAW_WEIGHTS = ("dit_moe", "diff_moe")       # top-k weights not renormalised
GROUP_ROUTING = ("expert_choice", "race", "soft", "diffmoe")   # choose across the batch in training
AUTO_MAP = {"AutoConfig": "configuration_megamoe.MegamoeConfig",
            "AutoModelForCausalLM": "modeling_megamoe.MegamoeForCausalLM"}


def problems(cfg) -> list[str]:
    """What even the remote code cannot express (field: reason). It runs every router family
    (capacity dropping and PLR included) and MoR with its LoRA adapters: what is left are
    `model.mor` options the export does not know, and expert choice per sequence (the remote
    code selects over all tokens of a call)."""
    moe, bad = cfg.model.moe, []
    if moe.router == "expert_choice" and moe.expert_choice.selection_group == "sequence":
        bad.append("model.moe.expert_choice.selection_group: 'sequence'; the Hugging Face "
                   "export selects over all tokens of a call (micro-batch)")
    return bad + modality_norm_problem(cfg) + hf_mor.problems(cfg)


def router_buffers(cfg) -> tuple[str, ...]:
    """The persistent buffers each MoE layer's router holds (megamoe.checkpoint.router_state),
    which the export must carry."""
    moe = cfg.model.moe
    names = {"race": ("threshold_ema", "threshold_updates"), "vmoe": ("noise_step",),
             "limoe": ("noise_step",), "diffmoe": ("expert_threshold",)}.get(moe.router, ())
    if moe.router in ("topk", "dit_moe", "diff_moe") and moe.loss_free_bias_rate > 0:
        names += ("selection_bias",)
    return names


def check_router_buffers(tensors: dict, cfg) -> None:
    """ValueError naming the first router buffer (of an MoE layer or the MoR depth router)
    that `tensors` lacks."""
    from megamoe.checkpoint.global_load import unstack_layers

    names = router_buffers(cfg)
    s = DecoderShape.from_config(cfg)
    need = [f"{p}mlp.router.{name}" for (p, _), is_moe in zip(s.layer_prefixes(), s.moe_layers)
            if is_moe for name in names]
    keys = set(unstack_layers(tensors))
    for key in [*need, *hf_mor.router_buffers(cfg)]:
        if key not in keys:
            raise ValueError(f"tensors: no {key!r}; this router keeps state in buffers: add "
                             "megamoe.checkpoint.router_state.gather_router_buffers(chunks) to "
                             "the exported tensors")


def hf_config(cfg, vocab_size: int) -> dict:
    from megamoe.specs.gpt_moe import moe_layer_pattern

    m, moe = cfg.model, cfg.model.moe
    s = DecoderShape.from_config(cfg)
    unrolled = moe_layer_pattern(m.num_layers, moe.layer_freq, moe.num_experts)
    return {
        "architectures": ["MegamoeForCausalLM"], "model_type": MODEL_TYPE, "auto_map": AUTO_MAP,
        "vocab_size": vocab_size, "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.groups, "head_dim": s.head_dim,
        "hidden_act": "silu", "rms_norm_eps": m.norm_epsilon,
        "rope_theta": float(int(m.rotary_base)),       # megamoe.models.lm: int(rotary_base)
        "max_position_embeddings": m.seq_length, "initializer_range": m.init_method_std,
        "qkv_bias": m.add_qkv_bias, "qk_norm": m.qk_layernorm,
        "moe_layers": [int(x) for x in unrolled], "num_experts": moe.num_experts,
        "moe_intermediate_size": moe.ffn_hidden_size, "router": moe.router,
        "num_experts_per_tok": moe.topk, "score_function": moe.score_function,
        "norm_topk_prob": renormalize(moe),
        "shared_expert_intermediate_size": moe.shared_expert_ffn_hidden_size,
        "shared_expert_gate": moe.shared_expert_gate,
        "router_aux_loss_coef": moe.aux_loss_coeff, "tie_word_embeddings": m.tie_embeddings,
        "use_cache": not hf_mor.enabled(cfg),      # MoR recomputes the prefix
        "dtype": "float32", **router_fields(cfg), **capacity_fields(moe),
        **hf_mor.hf_fields(cfg),
    }


def capacity_fields(moe) -> dict:
    """Megatron's token dropping (absent from config.json when dropless)."""
    if not moe.num_experts or moe.capacity_factor is None:
        return {}
    return {"capacity_factor": float(moe.capacity_factor), "token_drop_policy": moe.drop_policy,
            "pad_to_capacity": bool(moe.pad_to_capacity)}


def capacity_overrides(c) -> list[str]:
    if c.capacity_factor is None:
        return ["model.moe.capacity_factor=null"]
    return [f"model.moe.capacity_factor={float(c.capacity_factor)!r}",
            f"model.moe.drop_policy={c.token_drop_policy}",
            f"model.moe.pad_to_capacity={str(bool(c.pad_to_capacity)).lower()}",
            "model.moe.allow_non_causal=true"]      # dropping is not causal: it was trained so


def router_fields(cfg) -> dict:
    """The router family's config.json fields: options, loss-free bias, routing context."""
    moe, data = cfg.model.moe, cfg.data
    fields = {"router_options": {s: dataclasses.asdict(getattr(moe, s))
                                 for s in SECTIONS.get(moe.router, ())},
              "loss_free_bias_rate": float(getattr(moe, "loss_free_bias_rate", 0.0)),
              "router_z_loss_coef": float(moe.z_loss_coeff),   # some families refuse one
              "routing_context": {"synthetic_modalities": int(data.synthetic_modalities),
                                  "synthetic_timesteps": bool(data.synthetic_timesteps)}}
    if moe.router in RAW_WEIGHTS:
        fields["norm_topk_prob"] = False
    if moe.router == "soft":
        from megamoe.moe.routers.soft import SOFT_MOE_GROUPS

        fields["soft_moe_groups"] = SOFT_MOE_GROUPS       # the slots' rule (older: refused)
    return fields


def router_overrides(c) -> list[str]:
    """megamoe overrides for the router fields of a MegamoeConfig."""
    out = [f"model.moe.{section}.{key}={json.dumps(value)}"
           for section, options in c.router_options.items() for key, value in options.items()]
    out.append(f"model.moe.z_loss_coeff={float(c.router_z_loss_coef)!r}")
    if c.loss_free_bias_rate:
        out.append(f"model.moe.loss_free_bias_rate={float(c.loss_free_bias_rate)!r}")
    vmoe = c.router_options.get("vmoe", {})
    if c.router in GROUP_ROUTING or vmoe.get("capacity_ratio") is not None \
            or vmoe.get("eval_capacity_ratio") is not None:
        out.append("model.moe.allow_non_causal=true")     # it was trained so
    rc = c.routing_context
    if rc.get("synthetic_modalities"):
        out.append(f"data.synthetic_modalities={int(rc['synthetic_modalities'])}")
    if rc.get("synthetic_timesteps"):
        out.append("data.synthetic_timesteps=true")
    return out


def write_code(out_dir: str, files: tuple = CODE_FILES) -> None:
    """Copy the modeling code `files` next to config.json (what `auto_map` names)."""
    for name in files:
        src = os.path.join(CODE_DIR, name)
        if not os.path.isfile(src):
            raise ValueError(f"{src}: missing (megamoe installed without its package data?)")
        shutil.copyfile(src, os.path.join(out_dir, name))


def read_config(hf_dir: str, config_class=None):
    """The folder's config through megamoe's own copy of the code (no remote code is run):
    `config_class` (default MegamoeConfig) built from config.json's fields."""
    if config_class is None:
        from megamoe.checkpoint.hf_remote.configuration_megamoe import MegamoeConfig

        config_class = MegamoeConfig
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        fields = json.load(f)
    for key in ("model_type", "auto_map", "architectures", "transformers_version"):
        fields.pop(key, None)
    try:
        return config_class(**fields)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from None


def from_hf_config(c, where: str) -> tuple[list[str], DecoderShape]:
    """megamoe overrides and the tensor layout of a MegamoeConfig."""
    moe_layers = tuple(bool(x) for x in c.moe_layers)
    if c.num_experts and not any(moe_layers):
        raise ValueError(f"{where}: moe_layers {c.moe_layers} has no MoE layer but num_experts "
                         f"is {c.num_experts}")
    heads, groups, head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    shared = c.shared_expert_intermediate_size
    overrides = [
        f"model.num_layers={c.num_hidden_layers}", f"model.hidden_size={c.hidden_size}",
        f"model.ffn_hidden_size={c.intermediate_size}",
        f"model.num_attention_heads={heads}", f"model.num_query_groups={groups}",
        f"model.kv_channels={head_dim}", f"model.vocab_size={c.vocab_size}",
        f"model.norm_epsilon={float(c.rms_norm_eps)!r}",
        f"model.rotary_base={rope_theta(c, where)!r}",
        f"model.tie_embeddings={str(bool(c.tie_word_embeddings)).lower()}",
        f"model.init_method_std={float(c.initializer_range)!r}",
        f"model.qk_layernorm={str(bool(c.qk_norm)).lower()}",
        f"model.add_qkv_bias={str(bool(c.qkv_bias)).lower()}",
        f"model.moe.num_experts={c.num_experts}",
        f"model.moe.ffn_hidden_size={c.moe_intermediate_size}",
        f"model.moe.topk={c.num_experts_per_tok}", f"model.moe.router={c.router}",
        f"model.moe.score_function={c.score_function}", *capacity_overrides(c),
        f"model.moe.aux_loss_coeff={float(c.router_aux_loss_coef)!r}",
        layer_freq_override(moe_layers),
        f"model.moe.shared_expert_ffn_hidden_size={shared}",
        f"model.moe.shared_expert_gate={str(bool(c.shared_expert_gate)).lower()}",
        *renormalize_overrides(c.norm_topk_prob or c.router in RAW_WEIGHTS, where),
        *router_overrides(c),
    ]
    mor_unique = None
    if c.mor:
        overrides += hf_mor.overrides(c.mor)
        mor_unique, moe_layers = mor_stored_layers(c.mor["sharing"], c.mor["num_recursions"],
                                                   moe_layers)
    shape = DecoderShape(moe_layers=moe_layers, num_experts=c.num_experts, heads=heads,
                         groups=groups, head_dim=head_dim, qkv_bias=bool(c.qkv_bias),
                         qk_norm=bool(c.qk_norm), shared_expert=bool(shared),
                         shared_gate=bool(c.shared_expert_gate),
                         tied=bool(c.tie_word_embeddings), mor_unique=mor_unique)
    return overrides, shape
