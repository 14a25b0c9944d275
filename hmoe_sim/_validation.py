"""Small input checks shared by the library (private).

Every check raises ``ValueError`` (or ``TypeError`` for a wrong kind of object) with a
message that names the offending argument and its value, so that bad input never turns
into a silent wrong answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from numbers import Integral, Real

import numpy as np
import torch

__all__ = [
    "check_choice",
    "check_positive_int",
    "check_nonnegative_int",
    "check_positive_float",
    "check_finite_tensor",
    "check_float_tensor",
    "check_number",
    "check_seed",
]


def check_positive_int(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 1, else raise."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_nonnegative_int(name: str, value: object) -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 0, else raise."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be a non-negative integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def check_positive_float(name: str, value: object, *, allow_zero: bool = False) -> float:
    """Return ``value`` as a finite ``float`` > 0 (or >= 0 with ``allow_zero``), else raise."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    ok = v >= 0.0 if allow_zero else v > 0.0
    if not (ok and v < float("inf")):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be a finite {bound} number, got {value!r}")
    return v


def check_number(name: str, value: object, *, minimum: float | None = None, strict: bool = False,
                 allow_inf: bool = False) -> float:
    """Return ``value`` as a ``float`` if it is a real number (not NaN) in range, else raise.

    Parameters
    ----------
    name : str
        The argument's name, used in the message.
    value : object
        The value to check (``bool`` is rejected).
    minimum : float, optional
        Lower bound: ``value >= minimum``, or ``value > minimum`` with ``strict``.
    strict : bool
        Exclude ``minimum`` itself.
    allow_inf : bool
        Accept ``+inf`` (NaN and ``-inf`` are always rejected).

    Raises
    ------
    TypeError
        ``value`` is not a real number.
    ValueError
        ``value`` is NaN, infinite (without ``allow_inf``) or out of range; the message reads
        e.g. ``"tol must be a finite number > 0, got inf"``.
    """
    kind = "a number" if allow_inf else "a finite number"
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be {kind}{bound}, got {value!r} ({type(value).__name__})")
    v = float(value)
    bad = v != v or v == float("-inf") or (v == float("inf") and not allow_inf)
    if minimum is not None and not bad:
        bad = v < minimum or (strict and v == minimum)
    if bad:
        raise ValueError(f"{name} must be {kind}{bound}, got {value!r}")
    return v


def check_seed(name: str, value: object, *, generator: bool = True) -> object:
    """Return ``value`` if it is a seed: an integer >= 0, a ``SeedSequence`` or (with ``generator``) a ``Generator``.

    Raises
    ------
    ValueError
        Anything else (a negative or non-integer number, a string, a ``Generator`` where
        ``generator`` is false, ...), naming ``name`` and the value.
    """
    kinds = (np.random.SeedSequence, np.random.Generator) if generator else (np.random.SeedSequence,)
    if isinstance(value, kinds):
        return value
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        allowed = "a non-negative int, a SeedSequence or a Generator" if generator else \
            "a non-negative int or a SeedSequence"
        raise ValueError(f"{name} must be {allowed}, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming the choices."""
    options = tuple(choices)
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(map(repr, options))}")
    return str(value)


def check_float_tensor(name: str, value: object) -> torch.Tensor:
    """Require a floating-point torch tensor (no implicit conversion)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {value.dtype}")
    if value.device.type == "meta":
        raise ValueError(f"{name} is on device {value.device} (a tensor without data); "
                         "give a tensor on the CPU or a CUDA device")
    return value


def check_finite_tensor(name: str, value: torch.Tensor) -> torch.Tensor:
    """Raise if ``value`` holds NaN or infinite entries, naming the first bad index."""
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite)[0].tolist()
        raise ValueError(
            f"{name} contains non-finite values (first at index {tuple(bad)}: "
            f"{value[tuple(bad)].item()!r})"
        )
    return value
