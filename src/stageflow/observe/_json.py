"""JSON text that any UTF-8 reader accepts, whatever strings went in."""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["dumps"]

_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def dumps(obj: Any, *, indent: int | None = None, allow_nan: bool = True) -> str:
    """``json.dumps`` that keeps non-ASCII text readable and writes lone surrogates (which UTF-8
    cannot encode, e.g. ``"\\ud800"`` from a badly decoded file) as ``\\ud800`` escapes.

    ``json.loads`` of the result gives back exactly the same strings.

    Examples:
        >>> dumps({"k": "é\\ud800"})
        '{"k": "é\\\\ud800"}'
        >>> json.loads(dumps({"k": "é\\ud800"})) == {"k": "é\\ud800"}
        True
    """
    text = json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=allow_nan)
    # Outside strings JSON is ASCII, so every surrogate here sits inside a string literal.
    return _SURROGATE.sub(_escape, text)
