"""`ConfigError` and the small field checks that raise it.

Every message starts with the dotted field it concerns (`train.lr: must be > 0, got 0.0`), so a
user can find the line to fix. Checks take the section object and a field name; the section's
`SECTION` class attribute gives the dotted prefix. Comparisons are written `not (value >= low)`
so that NaN fails them too.
"""

from __future__ import annotations

from typing import Any, Iterable


class ConfigError(ValueError):
    """A user mistake in a config file, an override or a config object."""


def fail(field: str, message: str) -> None:
    raise ConfigError(f"{field}: {message}")


def field_path(section: Any, name: str) -> str:
    return f"{section.SECTION}.{name}"


def at_least(section: Any, name: str, low: float) -> None:
    """`section.name >= low`; None passes (types were checked before)."""
    value = getattr(section, name)
    if value is not None and not value >= low:
        fail(field_path(section, name), f"must be >= {low}, got {value!r}")


def greater_than(section: Any, name: str, low: float) -> None:
    """`section.name > low`; None passes."""
    value = getattr(section, name)
    if value is not None and not value > low:
        fail(field_path(section, name), f"must be > {low}, got {value!r}")


def in_range(section: Any, name: str, low: float, high: float, *,
             low_open: bool = False, high_open: bool = False) -> None:
    """`section.name` in the interval written as [low, high] with the given open ends."""
    value = getattr(section, name)
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        fail(field_path(section, name), f"must be in {interval}, got {value!r}")


def one_of(section: Any, name: str, choices: Iterable[str]) -> None:
    value = getattr(section, name)
    if value not in choices:
        fail(field_path(section, name), f"must be one of {' | '.join(choices)}, got {value!r}")
