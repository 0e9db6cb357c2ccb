"""``stageflow.untracked(...)``: data a stage keeps for itself — a call log, a counter — that caches and
batch journals leave out.

A cache key holds everything that decides a stage's outputs, including the data it reads from lists,
dicts and sets *as it is at call time*: a setting changed in place is a miss, never a stale hit. So a
stage that appends to a list it can reach changes its own key on every call and never hits (stageflow
warns once, naming the stage). When that data does not change the stage's outputs — a log of its
calls, a counter of them — create it with :func:`untracked`: the same list, dict or set, left out
of cache keys and of the fingerprints a batch journal compares before it resumes.

Only you can say that a container does not change outputs: stageflow cannot tell a log the stage
also reads (a chat history holding the system prompt) from one it only writes to.

Examples:
    >>> import stageflow
    >>> calls = stageflow.untracked([])
    >>> @stageflow.stage(writes=["y"])
    ... def double(x):
    ...     calls.append(x)
    ...     return {"y": 2 * x}
    >>> cached = stageflow.CachedStage(double)
    >>> cached(x=3)["y"], cached(x=3)["y"], calls
    (6, 6, [3])
    >>> isinstance(calls, list)
    True
"""

from __future__ import annotations

from typing import Any, TypeVar, cast

from stageflow.errors import ConfigurationError

__all__ = ["Untracked", "UntrackedDict", "UntrackedList", "UntrackedSet", "untracked"]

T = TypeVar("T", list[Any], dict[Any, Any], set[Any])


class Untracked:
    """Marks a container as data a stage keeps for itself (see :func:`untracked`)."""

    __slots__ = ()


class UntrackedList(list, Untracked):  # type: ignore[type-arg]
    """A ``list`` that caches and batch journals leave out."""

    __slots__ = ()


class UntrackedDict(dict, Untracked):  # type: ignore[type-arg]
    """A ``dict`` that caches and batch journals leave out."""

    __slots__ = ()


class UntrackedSet(set, Untracked):  # type: ignore[type-arg]
    """A ``set`` that caches and batch journals leave out."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(set(self))


def untracked(value: T) -> T:
    """A copy of ``value`` (a plain list, dict or set) that cache keys and batch journals leave out:
    for data a stage keeps for itself and whose content does not change its outputs (a call log, a
    counter). Wrap it where you create it (``calls = stageflow.untracked([])``): the stage must use
    the copy, not the original. Already untracked data is returned as it is.

    Raises:
        ConfigurationError: ``value`` is not a plain list, dict or set (a ``Counter`` or
            ``defaultdict`` would lose what its class adds).
    """
    t = type(value)
    if t is dict:
        return cast(T, UntrackedDict(value))
    if t is list:
        return cast(T, UntrackedList(value))
    if t is set:
        return cast(T, UntrackedSet(value))
    if isinstance(value, Untracked):
        return value
    if isinstance(value, list | dict | set):  # (a Counter, a defaultdict...: its behaviour would be lost)
        raise ConfigurationError(
            f"stageflow.untracked() takes a plain list, dict or set, not a {t.__name__}: the copy would "
            "lose what the class adds.",
            field="value",
            code="bad_option",
            hint="use untracked({}) and count with d[k] = d.get(k, 0) + 1",
        )
    raise ConfigurationError(
        f"stageflow.untracked() takes a list, dict or set, not {t.__name__}: the data a stage keeps for "
        "itself.",
        field="value",
        code="bad_option",
        hint="a call log: untracked([]); a counter: untracked({})",
    )
