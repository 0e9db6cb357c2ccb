"""Private copies of stage outputs for the cache: a hit has the type of the miss and shares nothing.

:meth:`Snapshot.take` copies a stage's output when it is stored (so the stage, or the caller who
got the miss, can change its result afterwards without changing the cache) and
:meth:`Snapshot.restore` builds a fresh object of the *same type* for every hit (so one caller's
``result.items.append(...)`` never reaches another hit). Outputs made only of immutable values —
the usual case, strings from an LM — are rebuilt without copying their values, in about a
microsecond; anything else is deep-copied on the way in and on the way out.

Examples:
    >>> import dspy
    >>> snap = Snapshot.take(dspy.Prediction(answer="42", tags=["a"]))
    >>> first, second = snap.restore(), snap.restore()
    >>> first.tags.append("b")
    >>> type(second).__name__, second.tags
    ('Prediction', ['a'])
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["Snapshot", "Uncopyable", "copy_value", "is_atomic"]

_ATOMIC: frozenset[type] = frozenset({str, int, float, bool, type(None), bytes, complex})


class Uncopyable(Exception):  # noqa: N818 - a signal: the output cannot be cached safely
    """A stage output cannot be copied (``copy.deepcopy`` failed on it)."""


def is_atomic(value: Any) -> bool:
    """Whether ``value`` is immutable all the way down (so sharing it is safe)."""
    t = type(value)
    if t in _ATOMIC:
        return True
    if t is tuple or t is frozenset:
        return all(is_atomic(v) for v in value)
    return False


def copy_value(value: Any) -> Any:
    """A deep copy, fast for plain data (lists, dicts, tuples of atoms); ``deepcopy`` otherwise."""
    t = type(value)
    if t in _ATOMIC:
        return value
    if t is list:
        return [copy_value(v) for v in value]
    if t is dict:
        return {k: copy_value(v) for k, v in value.items()}
    if (t is tuple or t is frozenset) and is_atomic(value):
        return value
    try:
        return copy.deepcopy(value)
    except Exception as e:
        raise Uncopyable(f"{t.__module__}.{t.__qualname__}: {type(e).__name__}: {e}") from e


_VALUE, _DICT, _RECORD, _MODEL = range(4)


class Snapshot:
    """A private copy of one stage output; :meth:`restore` returns a fresh equal object."""

    __slots__ = ("atomic", "cls", "data", "extra", "kind")

    def __init__(self, kind: int, cls: Any, data: Any, atomic: bool, extra: dict[str, Any]) -> None:
        self.kind = kind
        self.cls = cls
        self.data = data
        self.atomic = atomic
        self.extra = extra

    @classmethod
    def take(cls, out: Any) -> Snapshot:
        """Copy ``out`` (raises :class:`Uncopyable` when it cannot be copied)."""
        t = type(out)
        if t is dict:
            atomic = all(type(v) in _ATOMIC or is_atomic(v) for v in out.values())
            return cls(_DICT, t, dict(out) if atomic else copy_value(out), atomic, {})
        if _is_example(t):
            store = out.__dict__.get("_store")
        else:
            store = None
        if type(store) is dict:
            atomic = all(type(v) in _ATOMIC or is_atomic(v) for v in store.values())
            extra = {k: v for k, v in out.__dict__.items() if k != "_store"}
            completions = extra.get("_completions")
            if completions is not None:
                cstate = dict(completions.__dict__)
                cstate["_completions"] = copy_value(cstate.get("_completions"))
                extra["_completions"] = (type(completions), cstate)
            if "_run" in extra:
                extra["_run"] = type(extra["_run"])  # a hit did not run the nested pipeline
            if "_lm_usage" in extra:
                extra["_lm_usage"] = None  # a hit used no LM
            extra = {k: v if k in ("_completions", "_run") else copy_value(v) for k, v in extra.items()}
            return cls(_RECORD, t, dict(store) if atomic else copy_value(store), atomic, extra)
        if isinstance(getattr(t, "model_fields", None), dict) and hasattr(out, "model_copy"):
            atomic = all(is_atomic(v) for v in out.__dict__.values())
            return cls(_MODEL, t, out.model_copy(deep=not atomic), atomic, {})
        atomic = is_atomic(out)
        return cls(_VALUE, t, out if atomic else copy_value(out), atomic, {})

    def restore(self) -> Any:
        """A fresh object of the stored type, sharing nothing mutable with the cache."""
        kind, data = self.kind, self.data
        if kind == _DICT:
            return dict(data) if self.atomic else copy_value(data)
        if kind == _RECORD:
            obj = self.cls.__new__(self.cls)
            state: dict[str, Any] = {"_store": dict(data) if self.atomic else copy_value(data)}
            for k, v in self.extra.items():
                if k == "_completions" and v is not None:
                    ctype, cstate = v
                    c = ctype.__new__(ctype)
                    c.__dict__.update(cstate)
                    c.__dict__["_completions"] = copy_value(cstate.get("_completions"))
                    state[k] = c
                elif k == "_run":
                    state[k] = v()
                else:
                    state[k] = copy_value(v)
            obj.__dict__.update(state)
            return obj
        if kind == _MODEL:
            return data.model_copy(deep=not self.atomic)
        return data if self.atomic else copy_value(data)

    def value(self) -> Any:
        """The stored object itself (read-only use: encoding it for a persistent store)."""
        if self.kind == _RECORD:
            return self.restore()
        return self.data


_EXAMPLE_TYPES: dict[type, bool] = {}


def _is_example(t: type) -> bool:
    """Whether ``t`` is ``dspy.Example`` or a subclass (``Prediction``, stageflow's ``Result``)."""
    known = _EXAMPLE_TYPES.get(t)
    if known is None:
        known = any(c.__name__ == "Example" and c.__module__.startswith("dspy.") for c in t.__mro__)
        if len(_EXAMPLE_TYPES) > 256:  # classes made on the fly must not pile up
            _EXAMPLE_TYPES.clear()
        _EXAMPLE_TYPES[t] = known
    return known
