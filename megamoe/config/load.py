"""YAML recipe + `--set a.b=c` overrides → validated `Config`, and back to YAML."""

from __future__ import annotations

import dataclasses
import os
from datetime import datetime
from typing import Any, Iterable

import yaml

from megamoe.config.coerce import field_types, from_dict, join, unknown_key
from megamoe.config.errors import ConfigError
from megamoe.config.recipes import find_config
from megamoe.config.schema import Config
from megamoe.config.validate import validate

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | os.PathLike) -> dict:
    """The file's top-level mapping; ConfigError naming the file (and line) otherwise."""
    try:
        with open(path) as f:
            raw = yaml.load(f, Loader=_StrictLoader)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML syntax error: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run, model, parallel, "
                          f"train, data) at top level, got {type(raw).__name__}")
    return raw


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
    """Defaults ← YAML file (any subset of keys; a path or an installed recipe's name) ←
    overrides, then `validate`."""
    if isinstance(overrides, str):
        raise TypeError("overrides must be a list of 'a.b=c' strings, not one string")
    raw = read_yaml(find_config(path)) if path is not None else {}
    for override in overrides:
        apply_override(raw, override)
    cfg = from_dict(Config, raw)
    validate(cfg)
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
