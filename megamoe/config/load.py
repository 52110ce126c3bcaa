"""YAML recipe (composed of its fragments) + `--set a.b=c` overrides → `Config` with its fields
validated and its derived defaults filled, and back to YAML. The checks across sections, of
the device and of the input files are `megamoe.models.checks.check_config`, run before launch."""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime
from typing import Any, Iterable

import yaml

from megamoe.config.coerce import field_types, from_dict, join, unknown_key
from megamoe.config.compose import compose
from megamoe.config.derive import fill_derived
from megamoe.config.errors import ConfigError
from megamoe.config.recipes import find_config
from megamoe.config.schema import Config
from megamoe.config.validate import validate


def apply_override(raw: dict, override: str) -> None:
    """Set `a.b.c=value` in the raw nested dict; the value is parsed as YAML."""
    key, sep, text = override.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.lr=1e-3")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or e
        raise ConfigError(f"override {override!r}: cannot parse the value as YAML ({problem})"
                          ) from None
    cls, node, path = Config, raw, ""
    *sections, leaf = key.split(".")
    for name in sections:
        cls, path = _child_type(cls, path, name), join(path, name)
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{path}: not a section, cannot set {key!r}")
        child = node.get(name)
        if child is None:
            child = node[name] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"{path}: expected a mapping of keys, got {child!r}")
        node = child
    tp = _child_type(cls, path, leaf)
    if tp in (str, str | None) and isinstance(value, (bool, int, float)):
        value = text.strip()         # run.name=2024 means the string "2024"
    node[leaf] = value


def _child_type(cls: type, path: str, name: str) -> Any:
    types = field_types(cls)
    if name not in types:
        raise unknown_key(path, name, list(types))
    return types[name]


def load_config(path: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> Config:
    """Defaults ← YAML file (any subset of keys; a path or an installed recipe's name; its
    `defaults:` fragments under it) ← overrides; then `validate` (each field and section on its
    own) and `fill_derived`."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'a.b=c' strings, not one string")
    raw = compose(find_config(path)) if path is not None else {}
    for override in overrides:
        apply_override(raw, override)
    cfg = from_dict(Config, raw)
    validate(cfg)
    fill_derived(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


class _Dumper(yaml.SafeDumper):
    """Block-style sections, lists on one line (`layer_freq: [1, 0, 1, 0]`)."""


_Dumper.add_representer(list, lambda dumper, data: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", data, flow_style=True))


def dump_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write `cfg` as YAML that `load_config` reads back to an equal Config."""
    with open(path, "w") as f:
        yaml.dump(config_to_dict(cfg), f, Dumper=_Dumper, sort_keys=False)


def resolve_run_dir(cfg: Config, now: datetime | None = None) -> str:
    """`run.dir`, or runs/<name>-<YYYYmmdd-HHMMSS> when unset. Pure: `cfg` is not changed, so
    the launcher must resolve it once and hand the same directory to every rank."""
    if cfg.run.dir:
        return cfg.run.dir
    now = now or datetime.now()
    return os.path.join("runs", f"{cfg.run.name}-{now:%Y%m%d-%H%M%S}")
