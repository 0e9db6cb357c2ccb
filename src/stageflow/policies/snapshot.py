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
#: Attributes of a dspy record that a snapshot rebuilds rather than copies.
_RECORD_OWN = frozenset({"_store", "_completions", "_lm_usage", "_run"})


class Snapshot:
    """A private copy of one stage output; :meth:`restore` returns a fresh equal object."""

    __slots__ = ("atomic", "cls", "comp", "data", "extra", "kind", "rebuild", "run")

    def __init__(
        self,
        kind: int,
        cls: Any,
        data: Any,
        atomic: bool,
        extra: dict[str, Any] | None = None,
        comp: Any = None,
    ) -> None:
        self.kind = kind
        self.cls = cls
        self.data = data
        self.atomic = atomic
        self.extra = extra  # a record's other attributes (copied), or None
        self.comp = comp  # a Prediction's completions: (type, signature, fields or None = one, the store)
        self.rebuild = (False, False)  # a record's (fresh run info, no LM usage)
        self.run: tuple[Any, Any] | None = None  # a Result's pattern details (extras, details), copied

    @classmethod
    def take(cls, out: Any) -> Snapshot:
        """Copy ``out`` (raises :class:`Uncopyable` when it cannot be copied)."""
        t = type(out)
        if t is dict:
            atomic = _all_atomic(out)
            return cls(_DICT, t, dict(out) if atomic else copy_value(out), atomic)
        record = _RECORD_TYPES.get(t, _UNKNOWN)
        if record is _UNKNOWN:
            record = _record_info(t)
        state = out.__dict__ if record is not None else None
        store = state.get("_store") if state is not None else None
        if type(store) is dict and state is not None and record is not None:
            atomic = _ATOMIC.issuperset(map(type, store.values())) or _all_atomic(store)
            snap = cls(_RECORD, t, dict(store) if atomic else copy_value(store), atomic)
            snap.rebuild = record
            if record[0]:
                snap.run = _run_details(state.get("_run"))
            if atomic and _RECORD_OWN.issuperset(state):  # the usual Prediction: one completion or none
                comp = state.get("_completions")
                if comp is not None:
                    cstate = comp.__dict__
                    fields = cstate.get("_completions")
                    one = _single(fields, store)
                    snap.comp = (type(comp), cstate.get("signature"), None if one else _copy_fields(fields))
                return snap
            for k, v in state.items():
                if k == "_completions":
                    if v is not None:
                        fields = v.__dict__.get("_completions")
                        one = atomic and _single(fields, store)
                        snap.comp = (
                            type(v),
                            v.__dict__.get("signature"),
                            None if one else _copy_fields(fields),
                        )
                elif k not in _RECORD_OWN:
                    if snap.extra is None:
                        snap.extra = {}
                    snap.extra[k] = copy_value(v)
            return snap
        if isinstance(getattr(t, "model_fields", None), dict) and hasattr(out, "model_copy"):
            atomic = all(is_atomic(v) for v in out.__dict__.values())
            return cls(_MODEL, t, out.model_copy(deep=not atomic), atomic)
        atomic = is_atomic(out)
        return cls(_VALUE, t, out if atomic else copy_value(out), atomic)

    def restore(self) -> Any:
        """A fresh object of the stored type, sharing nothing mutable with the cache."""
        kind, data = self.kind, self.data
        if kind == _DICT:
            return dict(data) if self.atomic else copy_value(data)
        if kind == _RECORD:
            t = self.cls
            obj = t.__new__(t)
            store = dict(data) if self.atomic else copy_value(data)
            state: dict[str, Any] = {"_store": store}
            if self.comp is not None:
                ctype, signature, fields = self.comp
                c = ctype.__new__(ctype)
                c.__dict__.update(
                    signature=signature,
                    _completions={k: [v] for k, v in store.items()}
                    if fields is None
                    else _copy_fields(fields),
                )
                state["_completions"] = c
            run, prediction = self.rebuild
            if run:
                from stageflow.state import RunInfo

                # A hit did not run the nested pipeline: a fresh run, with no events, trace or usage,
                # that keeps what the pattern found (``individual_results``, ``route_decision``...).
                kept = self.run
                state["_run"] = (
                    RunInfo()
                    if kept is None
                    else RunInfo(extras=copy_value(kept[0]), details=copy_value(kept[1]))
                )
            if prediction:
                state.setdefault("_completions", None)
                state["_lm_usage"] = None  # a hit used no LM
            if self.extra is not None:
                state.update({k: copy_value(v) for k, v in self.extra.items()})
            obj.__dict__.update(state)
            return obj
        if kind == _MODEL:
            return data.model_copy(deep=not self.atomic)
        return data if self.atomic else copy_value(data)


def _run_details(run: Any) -> tuple[Any, Any] | None:
    """A copy of a run's pattern details (``extras``, nested ``details``), or ``None`` when it has
    none or they cannot be copied (a hit then has an empty run, as before)."""
    if run is None or not (run.extras or run.details):
        return None
    try:
        return copy_value(dict(run.extras)), copy_value(dict(run.details))
    except Uncopyable:
        return None


def _all_atomic(d: dict[Any, Any]) -> bool:
    return _ATOMIC.issuperset(map(type, d.values())) or all(is_atomic(v) for v in d.values())


def _copy_fields(fields: Any) -> Any:
    """Completions: ``{field: [value, ...]}``, copied (lists of atoms in one C call each)."""
    if type(fields) is not dict:
        return copy_value(fields)
    return {
        k: v[:] if type(v) is list and _ATOMIC.issuperset(map(type, v)) else copy_value(v)
        for k, v in fields.items()
    }


def _single(fields: Any, store: dict[str, Any]) -> bool:
    """Whether completions are exactly one completion equal to the record's own fields."""
    if type(fields) is not dict or len(fields) != len(store):
        return False
    for k, v in fields.items():
        if type(v) is not list or len(v) != 1 or k not in store or v[0] is not store[k]:
            return False
    return True


_RECORD_TYPES: dict[type, Any] = {}
_UNKNOWN = object()


def _record_info(t: type) -> tuple[bool, bool] | None:
    """For ``dspy.Example`` and its subclasses, ``(is stageflow's Result, is a dspy.Prediction)``;
    ``None`` for any other type. Remembered per type."""
    names = {(c.__module__.split(".")[0], c.__name__) for c in t.__mro__}
    info = (
        (("stageflow", "Result") in names, ("dspy", "Prediction") in names)
        if ("dspy", "Example") in names
        else None
    )
    if len(_RECORD_TYPES) > 256:  # classes made on the fly must not pile up
        _RECORD_TYPES.clear()
    _RECORD_TYPES[t] = info
    return info
