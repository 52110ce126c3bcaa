"""The one check entry: `check_config(cfg)` runs every per-concern check of a loaded config
before anything starts, so a cluster job fails in seconds instead of after allocation. Each
check is a small named function living with its concern; this file only lists them, in order.

`load_config` already validated each field and section on its own and filled the derived
defaults (`config.derive`); the checks here only read. Two groups:
- the config itself (what building the model and choosing a layout need): sections against each
  other, the MoE router families, Mixture-of-Recursions;
- a launch on this machine: the input files, the device's support for the layout, and the
  causality opt-in of the MoE router (checked again by each rank's loop).
"""

from __future__ import annotations

from megamoe.config.checks import check_sections
from megamoe.config.moe_families import check_families
from megamoe.data.checks import check_inputs
from megamoe.models.registry import family_for
from megamoe.platform import check_layout_supported


def check_family(cfg) -> None:
    """The model family's own checks (lm: Mixture-of-Recursions, megamoe.mor.checks)."""
    for check in family_for(cfg).checks:
        check(cfg)


def check_family_launch(cfg) -> None:
    """The model family's launch checks (lm: a non-causal MoE router needs the opt-in; the
    routers import Megatron, seconds, which the cheaper checks before it need not wait for)."""
    for check in family_for(cfg).launch_checks:
        check(cfg)


CONFIG_CHECKS = (
    check_sections,          # config.checks: parallel degrees vs shapes, batch, pipeline, SP
    check_families,          # config.moe_families: router families vs other sections
    check_family,            # the family record's checks (lm: MoR depth, stages, pool, LoRA)
)
LAUNCH_CHECKS = (
    check_inputs,            # data.checks: dataset, tokenizer, vocab size, resume path
    check_layout_supported,  # platform: layouts this device cannot run
    check_family_launch,     # the family record's launch checks (lm: router causality)
)


def check_config(cfg, *, launch: bool = True) -> None:
    """Raise ConfigError (or ValueError) for the first problem of `cfg`, one line naming the
    field or file. `launch=False`: only the config's own consistency (CONFIG_CHECKS), for code
    that builds a model from it or asks which layouts it admits, not a run on this machine."""
    for check in CONFIG_CHECKS + (LAUNCH_CHECKS if launch else ()):
        check(cfg)
