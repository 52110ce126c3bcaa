"""Typed run configuration: YAML recipe + `--set a.b=c` overrides → validated `Config`.

    cfg = load_config("configs/quickstart.yaml", ["train.lr=1e-3", "parallel.world_size=2"])

Validation runs inside `load_config` and needs no process group, so launchers call it first.
"""

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
    "load_config",
    "num_microbatches",
    "resolve_run_dir",
    "sequence_parallel_enabled",
    "validate",
]
