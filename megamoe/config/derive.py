"""Derived defaults: the one step that writes into a loaded config (`load_config` calls it after
validating the fields). Validators and checks only read; what a key left unset resolves to is
written here, so that the dumped config.yaml records it and a rerun reads the same value.

Only values that fix a parameter shape belong here (a checkpoint must agree with them);
defaults resolved where they are used (`model.mor.alpha`, `run.dir`) stay unset in the config.
"""

from __future__ import annotations

from megamoe.config.schema import Config


def fill_soft_slots(cfg: Config) -> None:
    """Soft MoE's parameters Φ have n·p columns: `model.moe.soft.slots_per_expert` p =
    round(m·C/n), m = tokens per sequence (`validate.sequence_length`: an image's patches
    and class token in the vit family; each sequence has its own slots, as the reference's
    `group_size`), n experts, unless given."""
    moe = cfg.model.moe
    soft = moe.soft
    if moe.router != "soft" or not moe.num_experts or soft.slots_per_expert is not None:
        return
    from megamoe.config.validate import sequence_length

    m = sequence_length(cfg)
    soft.slots_per_expert = max(1, round(m * soft.capacity_factor / moe.num_experts))


DERIVED = (fill_soft_slots,)


def fill_derived(cfg: Config) -> None:
    """Fill every derived default of `cfg` that is still unset (a filled one is kept)."""
    for fill in DERIVED:
        fill(cfg)
