"""Recipes composed of fragments: a config file may list others under `defaults:`.

    # configs/race.yaml
    defaults: [models/tiny_moe, data/markov, parallel/ep2, train/cosine_100]
    model:
      moe: {router: race}

A name is a path relative to the configs directory, `.yaml` optional, looked up next to the
top-level file first (its directory is the configs directory of a recipe in configs/), then in
the installed recipes (megamoe/recipes, the same files). A fragment may list fragments too.
Precedence, highest first: `--set` > the file's own keys > its fragments, a later one over an
earlier one > the built-in defaults. Mappings merge key by key; any other value (a list too)
replaces the earlier one. The result is one plain mapping: a run's dumped config.yaml holds no
`defaults:` and reloads to the same config.

Each file is checked on its own (keys and types), so an unknown key names the fragment that
holds it; a missing fragment and a cycle name the file that lists it.
"""

from __future__ import annotations

import copy
import os

import yaml

from megamoe.config.coerce import from_dict
from megamoe.config.errors import ConfigError
from megamoe.config.recipes import RECIPE_DIR
from megamoe.config.schema import Config

DEFAULTS_KEY = "defaults"
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


def compose(path: str | os.PathLike) -> dict:
    """The raw mapping of the config file `path` with its fragments merged in."""
    path = os.fspath(path)
    roots = _unique_dirs([os.path.dirname(os.path.abspath(path)), RECIPE_DIR])
    return _compose(path, path, roots, chain=())


def _compose(path: str, label: str, roots: list[str], chain: tuple) -> dict:
    """`chain`: (label, real path) of the files that led here, for cycles."""
    raw = read_yaml(path)
    names = raw.pop(DEFAULTS_KEY, None) or []
    if not (isinstance(names, list) and all(isinstance(n, str) and n for n in names)):
        raise ConfigError(f"{label}: {DEFAULTS_KEY}: expected a list of fragment names "
                          f"(paths relative to the configs directory), got {names!r}")
    try:
        from_dict(Config, raw)          # keys and types of this file alone
    except ConfigError as e:
        raise ConfigError(f"{label}: {e}") from None
    chain = (*chain, (label, os.path.realpath(path)))
    merged: dict = {}
    for name in names:
        fragment = find_fragment(name, roots, label)
        if os.path.realpath(fragment) in {real for _, real in chain}:
            loop = " → ".join([lbl for lbl, _ in chain] + [_fragment_file(name)])
            raise ConfigError(f"{label}: {DEFAULTS_KEY}: {name!r} forms a cycle: {loop}")
        merge(merged, _compose(fragment, _fragment_file(name), roots, chain))
    merge(merged, raw)
    return merged


def _fragment_file(name: str) -> str:
    return name if name.endswith(".yaml") else f"{name}.yaml"


def find_fragment(name: str, roots: list[str], label: str) -> str:
    """The file a `defaults:` entry names; ConfigError naming the listing file otherwise."""
    rel = _fragment_file(name)
    for root in roots:
        candidate = os.path.join(root, rel)
        if os.path.isfile(candidate):
            return candidate
    raise ConfigError(f"{label}: {DEFAULTS_KEY}: no fragment {name!r} (looked for {rel} in "
                      f"{', '.join(roots)})")


def merge(base: dict, update: dict) -> None:
    """Merge `update` into `base`: mappings key by key, other values replaced. An empty section
    (`model:` with nothing under it, read as null) leaves a merged mapping as it is."""
    for key, value in update.items():
        old = base.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            merge(old, value)
        elif isinstance(old, dict) and value is None:
            continue
        else:
            base[key] = copy.deepcopy(value)


def _unique_dirs(dirs: list[str]) -> list[str]:
    out, seen = [], set()
    for d in dirs:
        real = os.path.realpath(d)
        if real not in seen:
            seen.add(real)
            out.append(d)
    return out
