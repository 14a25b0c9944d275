"""Typed checks of configuration values: every error is one line naming the key and the bad value.

Used by :mod:`hmoe_sim.sweep.config` for every key of a sweep configuration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["fail", "fail_bool", "check_keys", "as_int", "as_float", "as_str", "as_name", "as_number", "as_bool"]

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./")


def fail(key: str, message: str) -> ValueError:
    """The error for ``key``, as one line naming the key."""
    return ValueError(f"config key {key!r}: {message}")


def check_keys(key: str, table: object, allowed: set[str] | Mapping[str, Any]) -> dict[str, Any]:
    """``table`` as a dict; refused when it is not a table or holds a key outside ``allowed``."""
    if not isinstance(table, Mapping):
        raise fail(key, f"expected a table, got {table!r}")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        where = f"{key}." if key else ""
        raise ValueError(f"unknown config key(s) {[where + u for u in unknown]}; known keys: {sorted(allowed)}")
    return dict(table)


def as_int(key: str, value: object, minimum: int) -> int:
    """An integer ``>= minimum`` (booleans refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise fail(key, f"must be an integer, got {value!r}")
    if value < minimum:
        raise fail(key, f"must be >= {minimum}, got {value!r}")
    return int(value)


def as_float(key: str, value: object, *, positive: bool = True) -> float:
    """A finite number, ``> 0`` (``positive``) or ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail(key, f"must be a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or (positive and v <= 0) or v < 0:
        raise fail(key, f"must be a finite {'positive' if positive else 'non-negative'} number, got {value!r}")
    return v


def as_str(key: str, value: object, choices: tuple[str, ...] | None = None) -> str:
    """A string, one of ``choices`` when given."""
    if not isinstance(value, str):
        raise fail(key, f"must be a string, got {value!r}")
    if choices is not None and value not in choices:
        raise fail(key, f"unknown value {value!r}; expected one of {list(choices)}")
    return value


def as_name(key: str, value: object) -> str:
    """A name safe in file names: letters, digits and ``_-./``, no ``..``, no leading ``.`` or ``/``."""
    v = as_str(key, value)
    if not v or not set(v) <= _NAME_CHARS or v.startswith((".", "/")) or ".." in v:
        raise fail(key, f"{v!r} must be non-empty and use only letters, digits and _-./")
    return v


def as_number(key: str, value: object, *, minimum: float, strict: bool) -> float:
    """A finite number ``> minimum`` (``strict``) or ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise fail(key, f"must be a finite number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise fail(key, f"must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def fail_bool(key: str, value: object) -> bool:
    """Raise the error of a value that is not a boolean."""
    raise fail(key, f"must be true or false, got {value!r}")


def as_bool(key: str, value: object) -> bool:
    """A boolean (``true`` or ``false`` in TOML)."""
    return value if isinstance(value, bool) else fail_bool(key, value)
