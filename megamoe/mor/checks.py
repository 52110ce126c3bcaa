"""Checks of an enabled `model.mor` against the rest of the config (papers.md §1), before any
process group exists: the depth L against the sharing scheme, pipeline stages of whole units,
the causality opt-in, the MoE families admitted in the shared pool, LoRA targets. Layouts and
options not supported yet are refused here, each as one ConfigError naming the field.

They live with MoR because they need its planning functions (`sharing`, `stages`);
`megamoe.models.checks.check_config` runs `check_mor` with the other concerns' checks.
"""

from __future__ import annotations

from megamoe.config.errors import fail
from megamoe.mor.sharing import base_depth, sharing_plan
from megamoe.mor.stages import decoder_units

POOL_ROUTERS = ("topk", "modality")     # MoE families allowed with model.mor (pads, context)


def check_depth(cfg) -> None:
    """L = `model.num_layers` splits into the unique layers + N_r · K shared ones."""
    m, mor = cfg.model, cfg.model.mor
    try:
        base_depth(mor.sharing, m.num_layers, mor.num_recursions)
    except ValueError as exc:
        fail("model.num_layers", str(exc).removeprefix("model.num_layers="))


def check_pipeline(cfg) -> None:
    """Pipeline stages hold whole units (the unique first layer, the recursion block, the
    unique last layer; megamoe.mor.stages), FLOP-balanced: each stage needs one, and the
    recursion block is never split. `model.num_layers` need not divide by the stages."""
    mor, p = cfg.model.mor, cfg.parallel
    if p.pipeline == 1:
        return
    if p.virtual_pipeline is not None:
        fail("parallel.virtual_pipeline", "model.mor places whole units (first layer, recursion "
             "block, last layer) on pipeline stages; the interleaved schedule is not supported "
             "(leave it unset)")
    units = decoder_units(mor.sharing)
    if p.pipeline > len(units):
        fail("parallel.pipeline", f"{p.pipeline} stages for the {len(units)} pipeline units of "
             f"model.mor.sharing={mor.sharing} ({', '.join(units)}): each stage needs one and the "
             f"recursion block is never split; use at most {len(units)}")


def check_causality(cfg) -> None:
    """Expert-choice takes a top-k over the sequence in training: refused in this causal
    decoder unless MoR's own opt-in is set."""
    mor = cfg.model.mor
    if mor.router == "expert" and not mor.allow_non_causal:
        fail("model.mor.router", "expert-choice depth routing takes a top-k over the sequence in "
             "training, so future tokens decide a token's depth (not causal in a decoder); set "
             "model.mor.allow_non_causal=true to train it anyway (σ > 0.5 at inference is "
             "causal), or use router=token")


def mor_moe_slots(cfg) -> set[int]:
    """Pool slots whose layer is MoE: `model.moe.layer_freq` read over the unrolled layers;
    ConfigError when two unrolled layers sharing a slot disagree."""
    m, mor = cfg.model, cfg.model.mor
    plan = sharing_plan(mor.sharing, m.num_layers, mor.num_recursions)
    freq = m.moe.layer_freq      # as models.specs.gpt_moe.moe_layer_pattern (no Megatron here)
    pattern = ([bool(m.moe.num_experts) and i % freq == 0 for i in range(m.num_layers)]
               if isinstance(freq, int) else [bool(m.moe.num_experts and x) for x in freq])
    is_moe: dict[int, bool] = {}
    for layer, slot in enumerate(plan.pool_index):
        if is_moe.setdefault(slot, pattern[layer]) != pattern[layer]:
            fail("model.moe.layer_freq", f"unrolled layers sharing pool slot {slot} "
                 f"(model.mor.sharing={mor.sharing}) must all be MoE or all dense; layer {layer} "
                 "differs")
    return {slot for slot, moe in is_moe.items() if moe}


def check_pool_slots(cfg) -> None:
    """The unrolled layers of a pool slot agree on MoE / dense."""
    mor_moe_slots(cfg)


def check_pool_routers(cfg) -> None:
    """MoE families admitted with MoR: those whose routers take the compact batches' pads as
    padding (`takes_padding_mask`) and read only per-token routing context, which the block
    compacts like the hidden states."""
    moe = cfg.model.moe
    if not moe.num_experts:
        return
    if moe.router not in POOL_ROUTERS:
        fail("model.moe.router", f"{moe.router!r} with model.mor: only {POOL_ROUTERS} MoE "
             "layers are supported so far (the others do not take the recursion block's pads "
             "as padding)")
    if moe.router == "modality" and moe.modality.mode == "vlmo" and moe.modality.vl_ffn_layers:
        fail("model.moe.modality.vl_ffn_layers", f"{moe.modality.vl_ffn_layers}: VLMo's VL "
             "layers are the top layers of the model, which a shared pool slot applied at "
             "several depths is not; set it to 0 with model.mor")


def check_lora_targets(cfg) -> None:
    """LoRA on `fc1`/`fc2` adapts a dense FFN; a MoE pool slot has expert FFNs (one LoRA per
    expert and application is not implemented)."""
    mor = cfg.model.mor
    ffn = [t for t in mor.lora_targets if t in ("fc1", "fc2")]
    if mor.lora_rank and ffn and mor_moe_slots(cfg) & _shared_slots(cfg):
        fail("model.mor.lora_targets", f"{ffn} on MoE layers of the shared pool: LoRA adapts "
             "dense linears only (attention qkv/proj, dense FFNs); drop them or make the pool "
             "dense (model.moe.layer_freq)")


def _shared_slots(cfg) -> set[int]:
    m, mor = cfg.model, cfg.model.mor
    plan = sharing_plan(mor.sharing, m.num_layers, mor.num_recursions)
    return {s for step in plan.recursion_steps() for s in step}


def check_timesteps(cfg) -> None:
    if cfg.data.synthetic_timesteps:
        fail("data.synthetic_timesteps", "no MoE router family admitted with model.mor reads "
             "timesteps (the timestep-conditioned families do not take pads as padding)")


MOR_CHECKS = (check_depth, check_pipeline, check_causality, check_pool_slots,
              check_pool_routers, check_lora_targets, check_timesteps)


def check_mor(cfg) -> None:
    """Raise ConfigError for the first problem of an enabled `model.mor`; reads only."""
    if not cfg.model.mor.enabled:
        return
    for check in MOR_CHECKS:
        check(cfg)
