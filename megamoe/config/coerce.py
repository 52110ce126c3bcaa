"""Build config dataclasses from plain dicts, and type-check built ones, from their annotations.

Accepted types: `bool`, `int`, `float`, `str`, `list[T]`, unions (`int | None`,
`int | list[int]`) and nested dataclasses. A bool is never an int or a float (`True` for a layer
count is a mistake), an int is a float, and when loading from text a string that parses as a
float is a float: PyYAML reads `3e-3` as a string (YAML 1.1 wants `3.0e-3`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping
from typing import Any

from megamoe.config.errors import ConfigError, fail


def field_types(cls: type) -> dict[str, Any]:
    """Field name → resolved annotation, in declaration order (ClassVars excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else str(name)


def unknown_key(path: str, key: Any, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
    return ConfigError(f"{join(path, key)}: unknown key ({hint})")


def type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _wrong_type(field: str, tp: Any, value: Any) -> None:
    fail(field, f"expected {type_name(tp)}, got {type(value).__name__} {value!r}")


def _scalar(value: Any, tp: type, field: str, parse_strings: bool) -> Any:
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if parse_strings and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    if tp is str and isinstance(value, str):
        return value
    _wrong_type(field, tp, value)


def coerce(value: Any, tp: Any, field: str, *, parse_strings: bool = True) -> Any:
    """`value` as type `tp`, or a ConfigError naming `field`."""
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, field)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            _wrong_type(field, tp, value)
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, field, parse_strings=parse_strings)
            except ConfigError:
                continue
        _wrong_type(field, tp, value)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            _wrong_type(field, tp, value)
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{field}[{i}]", parse_strings=parse_strings)
                for i, v in enumerate(value)]
    return _scalar(value, tp, field, parse_strings)


def from_dict(cls: type, raw: Any, path: str = "") -> Any:
    """An instance of dataclass `cls` from a (partial) mapping; missing keys keep defaults."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        fail(path or "config", f"expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    hints = field_types(cls)
    for key in raw:
        if key not in hints:
            raise unknown_key(path, key, list(hints))
    return cls(**{k: coerce(v, hints[k], join(path, k)) for k, v in raw.items()})


def check_types(obj: Any, path: str = "") -> None:
    """Raise ConfigError if a field of a built config holds a value of the wrong type."""
    for name, tp in field_types(type(obj)).items():
        value, field = getattr(obj, name), join(path, name)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                _wrong_type(field, tp, value)
            check_types(value, field)
        else:
            coerce(value, tp, field, parse_strings=False)


def check_finite(obj: Any, path: str = "") -> None:
    """Raise ConfigError naming the first float field (or list item) that is nan or ±inf:
    `train.lr=inf` parses as a float, passes every range check and turns the weights into NaN
    a step later."""
    for name in field_types(type(obj)):
        value, field = getattr(obj, name), join(path, name)
        if dataclasses.is_dataclass(value):
            check_finite(value, field)
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if isinstance(item, float) and not math.isfinite(item):
                where = field if i is None else f"{field}[{i}]"
                fail(where, f"must be a finite number, got {item!r}")
