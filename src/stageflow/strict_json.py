"""JSON that every parser reads: non-finite floats written as strings, never as bare ``NaN``.

Python's :func:`json.dumps` writes ``float("nan")`` as ``NaN`` and infinities as ``Infinity`` by
default, which strict JSON parsers (and most languages' libraries) refuse. Output files stageflow
writes (``stageflow run -o``, ``stageflow batch -o``) use :func:`dumps` instead: such a number
becomes the string ``"NaN"``, ``"Infinity"`` or ``"-Infinity"``, so the value is kept and the file
stays valid JSON.

Examples:
    >>> dumps({"score": float("nan"), "ok": [1.5, float("-inf")]})
    '{"score": "NaN", "ok": [1.5, "-Infinity"]}'
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps"]


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any, **options: Any) -> str:
    """:func:`json.dumps` of ``value`` with non-finite floats as strings (``options`` as for it).

    The common case costs one ``json.dumps``: the value is walked only when it holds such a number.
    A ``default=`` hook's results are walked too.
    """
    default = options.pop("default", None)

    def hook(obj: Any) -> Any:
        if default is None:
            raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")
        return _finite(default(obj))

    try:
        return json.dumps(value, allow_nan=False, default=hook, **options)
    except ValueError:  # "Out of range float values are not JSON compliant"
        return json.dumps(_finite(value), allow_nan=False, default=hook, **options)
