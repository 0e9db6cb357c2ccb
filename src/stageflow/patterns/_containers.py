"""Stage containers that notice when they are changed.

A pipeline holds its stages in flat lists and dicts (``self.stages``, ``self.branches``...) so DSPy
sees every predictor. Users (and DSPy's ``map_named_predictors``) may change those containers after
the pipeline was built: ``pipeline.stages.append(x)``, ``pipeline.stages[1] = y``. These subclasses
count such changes, and the pipeline rebuilds its plan before its next call, so a stage added that
way runs — never silently skipped — or, where the change has no meaning for the pattern, is refused
with a clear error. They are still a ``list`` / ``dict`` (DSPy's traversal, ``save``/``load`` and
deep copies see plain containers).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any, SupportsIndex

__all__ = ["StageDict", "StageList", "bump_structure", "structure_version"]

# Bumped whenever any pipeline's structure changes: cached contract checks and ports of every
# pipeline, including ones that hold the changed one, are then recomputed.
_STRUCTURE_VERSION = [0]


def structure_version() -> int:
    """The process-wide structure version (changes whenever any stage container changes)."""
    return _STRUCTURE_VERSION[0]


def bump_structure() -> None:
    """Record that some pipeline's structure changed."""
    _STRUCTURE_VERSION[0] += 1


class StageList(list):  # type: ignore[type-arg]
    """A list of stages with a change counter (``version``)."""

    version = 0

    def _changed(self) -> None:
        self.version += 1
        bump_structure()

    def __deepcopy__(self, memo: dict[int, Any]) -> StageList:
        new = type(self)(copy.deepcopy(list(self), memo))
        new.version = self.version
        return new

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (list(self),), {"version": self.version})

    def append(self, item: Any) -> None:
        super().append(item)
        self._changed()

    def extend(self, items: Iterable[Any]) -> None:
        super().extend(items)
        self._changed()

    def insert(self, index: SupportsIndex, item: Any) -> None:
        super().insert(index, item)
        self._changed()

    def pop(self, index: SupportsIndex = -1) -> Any:
        item = super().pop(index)
        self._changed()
        return item

    def remove(self, item: Any) -> None:
        super().remove(item)
        self._changed()

    def clear(self) -> None:
        super().clear()
        self._changed()

    def sort(self, *args: Any, **kwargs: Any) -> None:
        super().sort(*args, **kwargs)
        self._changed()

    def reverse(self) -> None:
        super().reverse()
        self._changed()

    def __setitem__(self, index: Any, item: Any) -> None:
        super().__setitem__(index, item)
        self._changed()

    def __delitem__(self, index: Any) -> None:
        super().__delitem__(index)
        self._changed()

    def __iadd__(self, items: Iterable[Any]) -> StageList:  # type: ignore[misc]
        super().__iadd__(items)
        self._changed()
        return self


class StageDict(dict):  # type: ignore[type-arg]
    """A dict of stages with a change counter (``version``)."""

    version = 0

    def _changed(self) -> None:
        self.version += 1
        bump_structure()

    def __deepcopy__(self, memo: dict[int, Any]) -> StageDict:
        new = type(self)(copy.deepcopy(dict(self), memo))
        new.version = self.version
        return new

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (dict(self),), {"version": self.version})

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)
        self._changed()

    def pop(self, *args: Any) -> Any:
        item = super().pop(*args)
        self._changed()
        return item

    def popitem(self) -> Any:
        item = super().popitem()
        self._changed()
        return item

    def clear(self) -> None:
        super().clear()
        self._changed()

    def update(self, *args: Any, **kwargs: Any) -> None:
        super().update(*args, **kwargs)
        self._changed()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        had = key in self
        value = super().setdefault(key, default)
        if not had:
            self._changed()
        return value

    def __ior__(self, other: Any) -> StageDict:  # type: ignore[misc]
        super().__ior__(other)
        self._changed()
        return self
