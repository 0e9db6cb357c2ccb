"""Running one record: its outputs or its error, and the LM usage it caused.

The same code runs a record in a local worker thread and inside a Ray actor, so both backends
produce the same rows. A failing record never raises out of :func:`run_record`: its error is
kept (type, message, stage path, code) and becomes an error row in the output.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import fractions
import json
import pathlib
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from stageflow import strict_json
from stageflow.errors import ContractError, error_text

__all__ = ["Outcome", "Usage", "error_info", "run_record", "to_json", "usage_scope"]


@dataclasses.dataclass(slots=True)
class Usage:
    """LM usage of one record or a whole run.

    Attributes:
        lm_calls: LM calls that reached a model (DSPy answer-cache hits are not billed and not counted).
        input_tokens: Prompt tokens of those calls.
        output_tokens: Completion tokens of those calls.
        cost: Their cost, when the model reports one (``None`` when none did).
        cache_hits: Stage outputs served by stageflow's stage cache (the stage did not run).
        lm_cache_hits: LM calls DSPy answered from its answer cache.
    """

    lm_calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = None
    cache_hits: int = 0
    lm_cache_hits: int = 0

    def add(self, other: Usage) -> None:
        """Add ``other`` into this one."""
        self.lm_calls += other.lm_calls
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cache_hits += other.cache_hits
        self.lm_cache_hits += other.lm_cache_hits
        if other.cost is not None:
            self.cost = (self.cost or 0.0) + other.cost

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the fields in order; written per record, so not ``dataclasses.asdict``).

        >>> Usage(1, 10, 2).as_dict()["output_tokens"], list(Usage().as_dict())[-1]
        (2, 'lm_cache_hits')
        """
        return {
            "lm_calls": self.lm_calls,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost": self.cost,
            "cache_hits": self.cache_hits,
            "lm_cache_hits": self.lm_cache_hits,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Usage:
        """The inverse of :meth:`as_dict` (unknown keys are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in (data or {}).items() if k in names})


@dataclasses.dataclass(slots=True)
class Outcome:
    """What one record produced.

    Attributes:
        ok: ``False`` when the record failed.
        outputs: The fields the pipeline wrote, as JSON text (:func:`run_record` encodes them, so a
            value the journal cannot hold fails its record; a dict is encoded when written);
            ``None`` on failure.
        error: ``{"type", "message", "stage_path", "code", "cause"}`` on failure.
        usage: The record's LM usage (also for a failed record: the calls made before it failed).
        elapsed: Wall seconds.
    """

    ok: bool
    outputs: Any
    error: dict[str, Any] | None
    usage: Usage
    elapsed: float


# Values whose text spells them out exactly: written as ``str(value)``.
_EXACT_TEXT = (
    datetime.date,
    datetime.time,
    datetime.timedelta,
    decimal.Decimal,
    uuid.UUID,
    fractions.Fraction,
    pathlib.PurePath,
    bytes,
    bytearray,
)


class UnwritableError(TypeError):
    """An output value that JSON cannot hold and stageflow has no exact JSON form for."""


def _plain(value: Any) -> Any:
    """A JSON-ready version of a value json cannot encode itself, holding all of it: never a text
    that abridges it (a large numpy array's ``str`` elides its middle) or an object's default
    ``<... at 0x...>``. Raises :class:`UnwritableError` for a value it has no such form for, or
    whose form has keys JSON would merge."""
    plain = _converted(value)
    _no_key_clash(plain)
    return plain


def _converted(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)  # pydantic models
    if callable(dump):
        _no_key_clash(dump())  # (its JSON form has merged such keys already)
        return dump(mode="json")
    to_dict = getattr(value, "toDict", None)  # dspy.Example / Prediction
    if callable(to_dict):
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, _EXACT_TEXT):
        return str(value)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray | np.generic) and not value.dtype.hasobject:
        return value.tolist()  # (a numpy scalar's tolist() is its Python value)
    raise UnwritableError(f"{type(value).__module__}.{type(value).__qualname__}")


def to_json(value: Any) -> str:
    """Compact, strict JSON; values json cannot encode become their pydantic/dict form or their text,
    non-finite floats the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"``."""
    return strict_json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_plain)


def error_info(exc: BaseException) -> dict[str, Any]:
    """The parts of an error kept in the journal and the output row."""
    cause = exc.__cause__
    message = getattr(exc, "message", None)
    stage_path, code = getattr(exc, "stage_path", None), getattr(exc, "code", None)
    if isinstance(exc, SystemExit):  # its ``code`` is whatever was passed to ``sys.exit``
        code = None
    return {
        "type": type(exc).__name__,
        "message": _storable(message if isinstance(message, str) else error_text(exc)),
        "stage_path": _storable(stage_path) if isinstance(stage_path, str) else None,
        "code": _storable(code) if isinstance(code, str) else None,
        "cause": None if cause is None else _storable(f"{type(cause).__name__}: {error_text(cause)}"),
    }


def _storable(text: str) -> str:
    """``text`` as valid UTF-8: a lone surrogate (``"\\ud800"``) becomes its escape, so an error
    message holding one cannot keep the journal from writing the record's error row."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


class _Scope:
    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def usage(self, run: Any) -> Usage:
        """The usage of the call: from its run's usage table (``result.run.usage`` of a stageflow
        pipeline, or ``error.run`` when it failed), else from the DSPy tracker of this scope."""
        table = getattr(run, "usage", None)
        total = getattr(table, "total", None)
        if total is not None:
            return Usage(
                total.lm_calls,
                total.input_tokens,
                total.output_tokens,
                total.cost,
                total.cache_hits,
                total.lm_cache_hits,
            )
        usage = Usage()
        if self.tracker is None:
            return usage
        for entries in self.tracker.usage_data.values():
            for entry in entries:
                usage.lm_calls += 1
                usage.input_tokens += int(entry.get("prompt_tokens") or 0)
                usage.output_tokens += int(entry.get("completion_tokens") or 0)
        return usage


@contextmanager
def usage_scope(program: Any) -> Iterator[_Scope]:
    """Collect the LM usage of one call of ``program`` (context-local: one per record).

    This is the one place that knows how usage is collected: a stageflow pipeline meters itself
    (``result.run.usage``: LM calls, tokens, cost, stage- and LM-cache hits); any other DSPy
    module gets a ``dspy.track_usage()`` tracker (calls and tokens only).
    """
    from stageflow.runtime.program import is_pipeline

    if is_pipeline(program):
        yield _Scope(None)
        return
    import dspy

    with dspy.track_usage() as tracker:
        yield _Scope(tracker)


def _fields(result: Any, inputs: Mapping[str, Any], declared: frozenset[str] | bool) -> dict[str, Any]:
    """The fields the program wrote (see :func:`_written` for ``declared``)."""
    if hasattr(result, "items") and callable(result.items):
        items = result.items()
    else:
        raise TypeError(
            f"the pipeline returned {type(result).__name__}, not a Prediction or a mapping of fields"
        )
    if declared is True:  # not a stageflow pipeline: what it returned is what it wrote
        return dict(items)
    if declared is False:  # a pipeline with undeclared outputs: inputs passed through are left out
        return {k: v for k, v in items if not (k in inputs and inputs[k] is v)}
    return {k: v for k, v in items if k in declared or k not in inputs}


def _written(program: Any) -> frozenset[str] | bool:
    """How to tell a program's outputs from its inputs in its result: a stageflow pipeline's result
    holds its inputs too, so its declared outputs (a frozenset) are its outputs, with the fields that
    are not inputs; ``False`` for a pipeline with undeclared outputs (an input counts as written when
    another object came back under its name); ``True`` for any other program (a ``dspy.Module``
    returns only what it computed: all of it is output, even the very object it was given)."""
    ports = getattr(program, "stageflow_ports", None)
    if ports is None:
        return True
    try:
        found = ports()
    except Exception:  # its contracts do not check: the call itself reports that
        return False
    if found.outputs is None or found.opaque or found.accepts_any:
        return False
    return frozenset(found.outputs)


def run_record(program: Any, inputs: dict[str, Any]) -> Outcome:
    """Run ``program(**inputs)`` (sync) and return its :class:`Outcome`; never raises for the record."""
    t0 = time.perf_counter()
    with usage_scope(program) as scope:
        try:
            result = program(**inputs)
            outputs = _fields(result, inputs, _written(program))
        except BaseException as exc:  # any failure is this record's error row
            if isinstance(exc, KeyboardInterrupt):
                raise
            usage = scope.usage(getattr(exc, "run", None))
            return Outcome(False, None, error_info(exc), usage, time.perf_counter() - t0)
    usage = scope.usage(getattr(result, "run", None))
    try:
        _no_key_clash(outputs)
        text = to_json(outputs)  # here, so a value the journal cannot hold fails this record only
        text.encode("utf-8")  # (a lone surrogate in a string: the journal cannot store it)
    except (TypeError, ValueError) as exc:  # UnwritableError, a key JSON cannot have, a cycle
        error = _unwritable(outputs, exc, result)
        return Outcome(False, None, error_info(error), usage, time.perf_counter() - t0)
    return Outcome(True, text, None, usage, time.perf_counter() - t0)


def _no_key_clash(value: Any, depth: int = 0) -> None:
    """JSON keys are text: ``{1: a, "1": b}`` would keep one of the two. Raise :class:`UnwritableError`
    for a mapping whose keys JSON would merge (walked through dicts, lists and tuples)."""
    if depth > 64:
        return  # (deeper than that, json refuses it anyway)
    if isinstance(value, Mapping):
        if not all(type(k) is str for k in value):
            seen: dict[str, Any] = {}
            for k in value:
                text = (
                    k
                    if isinstance(k, str)
                    else json.dumps(k)
                    if k is None or isinstance(k, bool | int | float)
                    else None
                )
                if text is None:
                    continue  # (json refuses that key itself)
                if text in seen:
                    raise UnwritableError(f"a dict whose keys {seen[text]!r} and {k!r} are one key in JSON")
                seen[text] = k
        for v in value.values():
            _no_key_clash(v, depth + 1)
    elif isinstance(value, list | tuple | set | frozenset):
        for v in value:
            _no_key_clash(v, depth + 1)


def _unwritable(outputs: dict[str, Any], exc: Exception, result: Any) -> ContractError:
    """The error of a record whose outputs the journal cannot hold, naming the field and the stage
    that wrote it."""
    field = next((k for k, v in outputs.items() if _fails(v)), None)
    where = f"the output field '{field}'" if field is not None else "an output field"
    stage = None if field is None else _writer(result, field, outputs[field])
    return ContractError(
        f"{where}{'' if stage is None else f' (written by stage {stage!r})'} holds a value the batch "
        f"journal cannot store as JSON without losing part of it ({exc}); the record is failed rather "
        "than written incompletely.",
        stage_path=stage,
        field=field,
        code="unwritable_output",
        hint="return plain data from the pipeline (text, numbers, lists, dicts), a pydantic model or a "
        "dataclass; convert other objects in a last stage (e.g. value.tolist(), str(value))",
    )


def _writer(result: Any, field: str, value: Any) -> str | None:
    """The path of the last stage whose output holds ``field`` — or, renamed, that very value —
    (``None`` when the result keeps no stage outputs)."""
    try:
        outputs = list(result.run.stage_outputs.items())
    except Exception:  # (not a stageflow result, or one whose records cannot be read)
        return None
    for named in (True, False):
        for path, out in reversed(outputs):
            store = getattr(out, "_store", out)
            if not isinstance(store, Mapping) or not isinstance(path, str):
                continue
            if (field in store) if named else any(v is value for v in store.values()):
                return path
    return None


def _fails(value: Any) -> bool:
    try:
        _no_key_clash(value)
        to_json(value).encode("utf-8")
    except (TypeError, ValueError):
        return True
    return False
