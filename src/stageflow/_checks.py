"""Checks for numeric options, shared by policies and patterns: a bad value is refused when given.

Each check raises :class:`~stageflow.ConfigurationError` naming the owner and the parameter, and
returns nothing when it is good. ``bool`` is never a number here (``True`` is not one
second), and ``nan`` is never in range.

Examples:
    >>> seconds(2.5, "TimeoutPolicy", "seconds")
    >>> seconds(float("nan"), "ForEach", "timeout")
    Traceback (most recent call last):
    ...
    stageflow.errors.ConfigurationError: ForEach: timeout must be a finite number of seconds > 0, got nan.
    Fix: pass e.g. timeout=30
"""

from __future__ import annotations

import math

from stageflow.errors import ConfigurationError

__all__ = ["count", "non_negative", "seconds"]


def _finite(value: object) -> float | None:
    """``value`` as a float when it is a finite real number (not a bool), else ``None``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def seconds(value: object, where: str, name: str) -> None:
    """A finite duration > 0 (a timeout, a time budget)."""
    number = _finite(value)
    if number is None or number <= 0:
        raise ConfigurationError(
            f"{where}: {name} must be a finite number of seconds > 0, got {value!r}.",
            field=name,
            code="bad_option",
            hint=f"pass e.g. {name}=30",
        )


def non_negative(value: object, where: str, name: str) -> None:
    """A finite number >= 0 (a delay, a factor)."""
    number = _finite(value)
    if number is None or number < 0:
        raise ConfigurationError(
            f"{where}: {name} must be a finite number >= 0, got {value!r}.",
            field=name,
            code="bad_option",
        )


def count(value: object, where: str, name: str, minimum: int) -> None:
    """A whole number >= ``minimum`` (attempts, repairs)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(
            f"{where}: {name} must be an int >= {minimum}, got {value!r}.",
            field=name,
            code="bad_option",
        )
