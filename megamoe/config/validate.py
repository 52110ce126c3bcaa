"""Field validation, run by `load_config`: field types, finite floats, then each section's own
checks (ranges, choices, keys of one section that must agree). Checks that span sections are
`megamoe.config.checks` and the other concerns of `megamoe.models.checks.check_config`.
"""

from __future__ import annotations

from megamoe.config.coerce import check_finite, check_types
from megamoe.config.schema import Config


def sequence_parallel_enabled(cfg: Config) -> bool:
    """`parallel.sequence_parallel` resolved: None means "on when tensor > 1"; without TP
    sequence parallelism is a no-op, so True with tensor == 1 resolves to False."""
    sp, tp = cfg.parallel.sequence_parallel, cfg.parallel.tensor
    return tp > 1 if sp is None else sp and tp > 1


def sequence_length(cfg: Config) -> int:
    """Tokens per sample the transformer sees: `model.seq_length` for the language model, the
    patch tokens (+ class token) of an image for the vit family (megamoe.config.vision),
    the patch tokens for the dit family (megamoe.config.diffusion)."""
    if cfg.model.family == "vit":
        from megamoe.config.vision import image_tokens

        return image_tokens(cfg)
    if cfg.model.family == "dit":
        from megamoe.config.diffusion import dit_tokens

        return dit_tokens(cfg)
    return cfg.model.seq_length


def num_microbatches(cfg: Config) -> int:
    """Micro-batches per rank per step: global_batch_size / (micro_batch_size · DP)."""
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * cfg.parallel.data)


def validate(cfg: Config) -> None:
    """Raise ConfigError for the first field of `cfg` that is wrong on its own; reads only."""
    check_types(cfg)
    check_finite(cfg)
    for section in (cfg.run, cfg.model, cfg.parallel, cfg.train, cfg.data):
        section.validate()
