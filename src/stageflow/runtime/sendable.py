"""Pickling a program for remote workers, with an error that names what could not be sent."""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from typing import Any

from stageflow.errors import ConfigurationError

__all__ = ["find_unpicklable", "pickle_for_workers"]

_MAX_DEPTH = 25


def _children(obj: Any) -> Iterator[tuple[str, Any]]:
    """``(path suffix, child)`` pairs that pickling ``obj`` pickles too."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield f"[{k!r}]", v
        return
    if isinstance(obj, list | tuple | set | frozenset):
        for i, v in enumerate(obj):
            yield f"[{i}]", v
        return
    if isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=False):
            try:
                yield f" (closure variable {name!r})", cell.cell_contents
            except ValueError:  # an empty cell
                continue
        for name in obj.__code__.co_names:
            if name in obj.__globals__:
                yield f" (global {name!r})", obj.__globals__[name]
        return
    if isinstance(obj, types.MethodType):
        yield ".__self__", obj.__self__
        return
    state: Any = None
    getstate = getattr(obj, "__getstate__", None)
    if callable(getstate):
        try:
            state = getstate()
        except Exception:
            state = None
    if state is None:
        state = getattr(obj, "__dict__", None)
    if isinstance(state, dict):
        for k, v in state.items():
            yield f".{k}", v


def find_unpicklable(obj: Any, dumps: Callable[[Any], bytes], root: str = "program") -> tuple[str, Any]:
    """The deepest part of ``obj`` that ``dumps`` fails on: ``(path, object)``."""
    path, current = root, obj
    seen: set[int] = set()
    for _ in range(_MAX_DEPTH):
        seen.add(id(current))
        for suffix, child in _children(current):
            if id(child) in seen or isinstance(child, str | bytes | int | float | bool | type(None)):
                continue
            try:
                dumps(child)
            except Exception:
                path, current = path + suffix, child
                break
        else:
            return path, current
    return path, current


def pickle_for_workers(
    obj: Any,
    what: str,
    hint: str,
    *,
    dumps: Callable[[Any], bytes] | None = None,
    dest: str = "the Ray workers",
) -> bytes:
    """``obj`` pickled with ``dumps`` (default: Ray's cloudpickle), or a :class:`ConfigurationError`
    naming the part that cannot be pickled (e.g. ``program.stages[1].fn (closure variable 'lock')``)."""
    if dumps is None:
        from ray import cloudpickle

        dumps = cloudpickle.dumps
    try:
        data: bytes = dumps(obj)
    except Exception as exc:
        path, culprit = find_unpicklable(obj, dumps, what)
        raise ConfigurationError(
            f"cannot send the {what} to {dest}: {path} (a {type(culprit).__module__}."
            f"{type(culprit).__qualname__}) cannot be pickled ({type(exc).__name__}: {exc}).",
            code="not_picklable",
            hint=hint,
        ) from exc
    return data
