"""Typed run configuration: YAML recipe + `--set a.b=c` overrides → validated `Config`.

    cfg = load_config("configs/lm_quickstart.yaml", ["train.lr=1e-3", "parallel.world_size=2"])

`load_config` composes the recipe from its `defaults:` fragments, validates each field and
section on its own and fills the derived defaults; `megamoe.models.checks.check_config` runs the
checks across sections and concerns. Neither needs a process group: launchers call both first.
"""

from megamoe.config.derive import fill_derived
from megamoe.config.errors import ConfigError
from megamoe.config.load import config_to_dict, dump_config, load_config, resolve_run_dir
from megamoe.config.schema import (
    KNOWN_ROUTERS,
    Config,
    DataConfig,
    MoEConfig,
    ModelConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from megamoe.config.validate import num_microbatches, sequence_parallel_enabled, validate

__all__ = [
    "KNOWN_ROUTERS",
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "config_to_dict",
    "dump_config",
    "fill_derived",
    "load_config",
    "num_microbatches",
    "resolve_run_dir",
    "sequence_parallel_enabled",
    "validate",
]
