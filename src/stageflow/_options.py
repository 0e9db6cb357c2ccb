"""Checking whole-number options (``concurrency=``, ``processes=``, ...) in one way everywhere.

>>> whole_number(3, "processes"), whole_number(None, "max_concurrency", none_ok=True)
(3, None)
>>> whole_number(0, "concurrency")
Traceback (most recent call last):
...
stageflow.errors.ConfigurationError: concurrency must be a positive int, got 0.
"""

from __future__ import annotations

import operator
from typing import Any

from stageflow.errors import ConfigurationError

__all__ = ["whole_number"]


def whole_number(value: Any, name: str, *, minimum: int = 1, none_ok: bool = False) -> Any:
    """``value`` as an ``int`` (any integer type: a numpy integer too) when it is at least
    ``minimum`` (or ``None`` when ``none_ok``); else :class:`ConfigurationError` naming ``name``.
    A bool is refused: ``True`` is not a count."""
    if value is None and none_ok:
        return None
    number: int | None = None
    if not isinstance(value, bool):
        try:
            number = operator.index(value)
        except TypeError:
            number = None
    if number is None or number < minimum:
        wanted = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ConfigurationError(
            f"{name} must be {wanted}{' or None' if none_ok else ''}, got {value!r}.",
            field=name,
            code="bad_option",
        )
    return number
