"""Model families: `model.family` selects one registered record, and everything below the CLI
(engine, loop, metrics, checkpoint, commands) works through it instead of reading one family's
config fields.

A record says how to build this rank's model chunks from the config and its grid, how a
micro-batch becomes model inputs, context and a loss (the task), how to count parameters and
FLOPs, what to check before any process starts, whether the model is causal, and what the family
adds to the loop (metrics read after each step, hooks run after each optimizer step). Families
register themselves on import (`megamoe.models.<name>.family`); the Hugging Face mappings
sit above this layer (`megamoe.checkpoint.hf.MAPPED_MODEL_FAMILIES`), since model code never imports
checkpoint code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

_FAMILIES: dict[str, "Family"] = {}


@dataclass(frozen=True)
class Family:
    name: str
    transformer_config: Callable  # (cfg, dims, *, sequence_parallel, dtype) -> Megatron's
    build: Callable              # (cfg, tconfig, grid, vocab_size, grids=) -> model chunks
                                 # (grid: the "lm" grid; grids: every named grid)
    task: Callable               # (cfg) -> the family's Task (see megamoe.models.task)
    parameter_counts: Callable   # (cfg, vocab_size) -> (total, active per unit)
    flops_per_unit: Callable     # (cfg, vocab_size) -> training FLOPs per token or sample
    checks: tuple = ()           # (cfg) -> None, ConfigError/ValueError naming the field:
                                 # the config's own consistency (megamoe.models.checks)
    launch_checks: tuple = ()    # the same, for a run on this machine (may import Megatron)
    causal: bool = True          # decoders: non-causal routers need an explicit opt-in
    unit: str = "token"          # what `parameters active per …` and FLOPs count
    step_metrics: Callable | None = None   # (cfg, chunks, grid, vocab) -> StepMetrics or None
    after_step_hooks: Callable | None = None   # (chunks, grid) -> [callable()]
    describe: Callable | None = None       # (cfg, vocab) -> {start-up line: text}
    dataset_kwargs: Callable | None = None  # (cfg) -> what build_datasets needs from the model
    grad_sync: Callable | None = None      # (chunks, grids) -> callable() run before Megatron's
                                           # gradient reduction (vlm: the encoder's own grid)
    notes: str = ""


def register(family: Family) -> Family:
    assert family.name not in _FAMILIES, f"model family {family.name!r} registered twice"
    _FAMILIES[family.name] = family
    return family


def _load_builtin() -> None:
    from megamoe.models.dit import family as dit_family
    from megamoe.models.lm import family as lm_family
    from megamoe.models.vit import family as vit_family
    from megamoe.models.vlm import family as vlm_family

    assert {lm_family.LM.name, vit_family.VIT.name, vlm_family.VLM.name,
            dit_family.DIT.name} <= set(_FAMILIES)


def families() -> dict[str, Family]:
    _load_builtin()
    return dict(_FAMILIES)


def family_for(cfg) -> Family:
    """The record `model.family` names; ValueError naming the field and the known ones (the
    config's own check, megamoe.config.schema.MODEL_FAMILIES, names the same ones)."""
    known = families()
    name = getattr(cfg.model, "family", "lm")
    if name not in known:
        raise ValueError(f"model.family: unknown family {name!r} (known: "
                         f"{', '.join(sorted(known))})")
    return known[name]


def family_datasets(cfg):
    """(train, valid, vocab or class count) of the run's data, built with what the family's
    data needs from the model (the vlm family: image placeholders per sample)."""
    from megamoe.data.batches import build_datasets

    family = family_for(cfg)
    extra = family.dataset_kwargs(cfg) if family.dataset_kwargs else {}
    return build_datasets(cfg.data, cfg.model.seq_length, cfg.run.seed, **extra)
