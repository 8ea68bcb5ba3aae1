"""Hyperparameter constraints: small checks an optimizer declares, run by the base class.

Each constraint is called as ``check(name, value)`` and raises ``ValueError`` naming the
hyperparameter and the offending value. Nothing is clamped. Numbers are Python numbers: a
tensor is accepted only where a constraint says so (``tensor_or``: lr and weight_decay).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch

Constraint = Callable[[str, Any], None]

__all__ = [
    "Constraint",
    "boolean",
    "integer_at_least",
    "non_negative",
    "non_negative_or_inf",
    "non_positive",
    "one_of",
    "only_false",
    "optional",
    "positive",
    "positive_or_inf",
    "probability",
    "real_tuple",
    "real",
    "tensor_or",
    "tuple_of",
    "unit_interval",
    "beta_tuple",
    "closed_unit_interval",
]


def _fail(name: str, value: Any, expected: str) -> None:
    raise ValueError(f"invalid {name}={value!r}: expected {expected}")


def _as_real(name: str, value: Any, expected: str) -> float:
    if isinstance(value, torch.Tensor):
        _fail(name, value, f"{expected}, as a Python number (of the hyperparameters, only lr and "
                           "weight_decay may be tensors)")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, value, expected)
    try:
        return float(value)
    except OverflowError:   # an int (or Fraction) beyond float range: no usable hyperparameter
        return math.inf if value > 0 else -math.inf


def real(name: str, value: Any) -> None:
    """A finite real number."""
    if not math.isfinite(_as_real(name, value, "a finite real number")):
        _fail(name, value, "a finite real number")


def non_negative(name: str, value: Any) -> None:
    """A finite real number >= 0."""
    x = _as_real(name, value, "a real number >= 0")
    if not (0.0 <= x < math.inf):
        _fail(name, value, "a finite real number >= 0")


def non_positive(name: str, value: Any) -> None:
    """A finite real number <= 0."""
    x = _as_real(name, value, "a real number <= 0")
    if not (-math.inf < x <= 0.0):
        _fail(name, value, "a finite real number <= 0")


def positive(name: str, value: Any) -> None:
    """A finite real number > 0."""
    x = _as_real(name, value, "a real number > 0")
    if not (0.0 < x < math.inf):
        _fail(name, value, "a finite real number > 0")


def positive_or_inf(name: str, value: Any) -> None:
    """A real number > 0, infinity included (e.g. an unlimited growth rate)."""
    x = _as_real(name, value, "a real number > 0 or inf")
    if not x > 0.0:
        _fail(name, value, "a real number > 0 or inf")


def non_negative_or_inf(name: str, value: Any) -> None:
    """A real number >= 0, infinity included (e.g. an unlimited size)."""
    x = _as_real(name, value, "a real number >= 0 or inf")
    if not x >= 0.0:
        _fail(name, value, "a real number >= 0 or inf")


def probability(name: str, value: Any) -> None:
    """A real number in [0, 1]."""
    x = _as_real(name, value, "a real number in [0, 1]")
    if not (0.0 <= x <= 1.0):
        _fail(name, value, "a real number in [0, 1]")


def unit_interval(name: str, value: Any) -> None:
    """A real number in [0, 1)."""
    x = _as_real(name, value, "a real number in [0, 1)")
    if not (0.0 <= x < 1.0):
        _fail(name, value, "a real number in [0, 1)")


def closed_unit_interval(name: str, value: Any) -> None:
    """A real number in [0, 1] (1: a sum rather than a moving average)."""
    x = _as_real(name, value, "a real number in [0, 1]")
    if not (0.0 <= x <= 1.0):
        _fail(name, value, "a real number in [0, 1]")


def beta_tuple(n: int = 2) -> Constraint:
    """A tuple of ``n`` numbers, each in [0, 1)."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != n:
            _fail(name, value, f"a tuple of {n} numbers in [0, 1)")
        for i, b in enumerate(value):
            unit_interval(f"{name}[{i}]", b)

    return check


def real_tuple(n: int) -> Constraint:
    """A tuple of ``n`` finite real numbers (e.g. polynomial coefficients)."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != n:
            _fail(name, value, f"a tuple of {n} finite real numbers")
        for i, x in enumerate(value):
            real(f"{name}[{i}]", x)

    return check


def tuple_of(*checks: Constraint) -> Constraint:
    """A tuple (or list) with one entry per check, each accepted by its check."""

    def check(name: str, value: Any) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != len(checks):
            _fail(name, value, f"a tuple of {len(checks)} values")
        for i, (x, each) in enumerate(zip(value, checks)):
            each(f"{name}[{i}]", x)

    return check


def tensor_or(check: Constraint) -> Constraint:
    """A value ``check`` accepts, or a real tensor of one element (any shape: ``[]``, ``[1]``,
    ``[1, 1]``) holding one, as torch.optim accepts for lr. The base reads it as a number at
    each step, so changing it in place (``lr.fill_(x)``) takes effect at the next step."""

    def tensor_or_check(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or value.is_complex() or value.dtype == torch.bool:
                _fail(name, value, "a number or a real tensor with one element")
            check(name, value.item())
        else:
            check(name, value)

    inner = (check.__doc__ or "a value it accepts").strip().rstrip(".")
    tensor_or_check.__doc__ = f"{inner}, or a one-element tensor holding one."
    return tensor_or_check


def boolean(name: str, value: Any) -> None:
    """True or False."""
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


def only_false(reason: str) -> Constraint:
    """False: an option optforge does not have (torch.optim's ``capturable=True``, ...),
    accepted so that torch's signatures carry over; ``reason`` says why True is refused."""

    def check(name: str, value: Any) -> None:
        if value is not False:
            _fail(name, value, f"False ({reason})")

    return check


def integer_at_least(low: int) -> Constraint:
    """An int >= ``low``."""

    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            _fail(name, value, f"an integer >= {low}")

    return check


def one_of(*choices: Any) -> Constraint:
    """One of the given values."""

    def check(name: str, value: Any) -> None:
        if value not in choices:
            _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))

    return check


def optional(check: Constraint) -> Constraint:
    """None (the optimizer derives the value), or a value ``check`` accepts."""

    def optional_check(name: str, value: Any) -> None:
        if value is not None:
            check(name, value)

    inner = (check.__doc__ or "a value it accepts").strip().rstrip(".")
    optional_check.__doc__ = f"None (the optimizer derives the value), or {inner[:1].lower()}{inner[1:]}."
    return optional_check
