"""Map a stage path (``stages[1].branches['math']``) back to the spec key it was built from."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from stageflow.spec._source import KeyPath

__all__ = ["locate_stage"]

_SEGMENT = re.compile(r"^(\w+)((?:\[(?:\d+|'[^']*')\])*)$")
_INDEX = re.compile(r"\[(\d+|'[^']*')\]")


def locate_stage(root: Any, stage_path: str | None, locations: Mapping[int, KeyPath]) -> KeyPath | None:
    """The key path of the deepest object on ``stage_path`` (``stages[1].branches['x']``) that was built
    from the spec."""
    obj, best = root, locations.get(id(root))
    for segment in (stage_path or "").split("."):
        m = _SEGMENT.match(segment)
        if not m:
            break
        obj = getattr(obj, m.group(1), None)
        for idx in _INDEX.findall(m.group(2)):
            try:
                obj = obj[int(idx)] if idx.isdigit() else obj[idx.strip("'")]  # type: ignore[index]
            except (IndexError, KeyError, TypeError):
                obj = None
        if obj is None:
            break
        best = locations.get(id(obj), best)
    return best
