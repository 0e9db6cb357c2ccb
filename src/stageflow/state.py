"""The result of a pipeline call: final state as fields, run details as attributes."""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import dspy

from stageflow.usage import UsageTable

_new = object.__new__

__all__ = ["Result", "RunInfo", "StageKeyed", "StageRecord", "StageTrace", "stage_key"]


class StageRecord(NamedTuple):
    """One stage execution in a run, in order (a named tuple: cheap to record).

    Attributes:
        path: The stage's DSPy-style path (``stages[1]``, ``branches['math'].predict``).
        elapsed: Wall seconds (monotonic clock).
        ok: ``False`` when the stage raised.
    """

    path: str
    elapsed: float
    ok: bool = True


_TUTORIAL_NAME = re.compile(r"^stage_(\d+)((?:[.\[].*)?)$")


def stage_key(name: str) -> str:
    """A stage's path from the tutorial's name for it: ``stage_2`` → ``stages[2]`` (paths unchanged).

    Examples:
        >>> stage_key("stage_2"), stage_key("stages[1].predict")
        ('stages[2]', 'stages[1].predict')
    """
    m = _TUTORIAL_NAME.match(name) if isinstance(name, str) else None
    return f"stages[{m.group(1)}]{m.group(2)}" if m else name


class StageKeyed(dict):  # type: ignore[type-arg]
    """A dict keyed by stage path that also answers to the tutorial's names (``stage_0``)."""

    def __missing__(self, key: Any) -> Any:
        path = stage_key(key)
        if path != key and dict.__contains__(self, path):
            return dict.__getitem__(self, path)
        raise KeyError(key)

    def __contains__(self, key: object) -> bool:
        return dict.__contains__(self, key) or (
            isinstance(key, str) and dict.__contains__(self, stage_key(key))
        )

    def get(self, key: Any, default: Any = None) -> Any:
        if dict.__contains__(self, key):
            return dict.__getitem__(self, key)
        path = stage_key(key) if isinstance(key, str) else key
        return dict.get(self, path, default)


class StageTrace(list):  # type: ignore[type-arg]
    """The stages that ran, in order (:class:`StageRecord` entries), that can also be read like the
    tutorial's ``trace`` — a mapping of each stage's output by name: ``result.trace["stage_0"]``."""

    def __init__(self, records: Any, outputs: StageKeyed) -> None:
        super().__init__(records)
        self.outputs = outputs

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self.outputs[key]
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):  # (a stage's path or tutorial name, as the tutorial's mapping)
            return key in self.outputs
        return list.__contains__(self, key)

    def keys(self) -> Any:
        """The stage paths with an output (as the tutorial's trace mapping)."""
        return self.outputs.keys()

    def values(self) -> Any:
        """The stages' outputs."""
        return self.outputs.values()

    def items(self) -> Any:
        """``(path, output)`` pairs."""
        return self.outputs.items()


class _Joined(tuple):  # type: ignore[type-arg]
    """``(prefix, run)``: a nested pipeline's run joined to an enclosing one, not expanded yet;
    ``(prefix, run, elapsed)`` also stands for the nested pipeline's own record (``StageRecord(prefix,
    elapsed)``, which comes first in the trace), as an in-line nested run joins.

    It sits where the nested run's records belong (in the enclosing run's trace, outputs and
    details) until one of those is read. Joining eagerly re-prefixed every record of the nested
    run at every level, which made deep nesting quadratic in depth. (A tuple made with
    ``tuple.__new__``, compared and hashed by identity: it is also a placeholder key.)
    """

    __slots__ = ()
    __hash__ = object.__hash__
    __eq__ = object.__eq__


class RunInfo:
    """Run details of one pipeline call (kept out of the result's fields).

    Attributes:
        stage_outputs: Each stage's raw output, by stage path (the last one for loops).
        trace: Ordered :class:`StageRecord` entries, nested stages included.
        extras: Pattern-specific details (``route_decision``, ``converged``, ``iterations``...).
        events: What policies did: retries, repairs, timeouts, fallbacks, recoveries, skips and
            cache hits (:class:`~stageflow.policies.PolicyEvent`), in order.
        details: The run details of nested pipelines, by their full stage path (a ForEach's
            ``item_errors``, a loop's ``iterations``, an adaptive stage's ``used_structure``...).
        usage: LM calls, tokens, cost, cache hits, retries and repairs by stage path
            (:class:`~stageflow.usage.UsageTable`; ``run.usage.total``, ``run.usage.tree()``).

    A nested pipeline's run joins under its stage's path (:meth:`absorb`); its records are given
    their full paths when ``trace``, ``stage_outputs`` or ``details`` is read. The engine writes the
    raw ``_trace`` / ``_outputs`` directly.

    Examples:
        >>> inner = RunInfo()
        >>> inner._trace.append(StageRecord("stages[0]", 0.1))
        >>> outer = RunInfo()
        >>> outer.absorb("stages[2]", inner)
        >>> [r.path for r in outer.trace]
        ['stages[2].stages[0]']
    """

    __slots__ = (
        "_details",
        "_failed",
        "_lazy_details",
        "_lazy_outputs",
        "_lazy_trace",
        "_outputs",
        "_pending",
        "_tokens",
        "_trace",
        "_usage",
        "events",
        "extras",
    )

    def __init__(
        self,
        stage_outputs: dict[str, Any] | None = None,
        trace: list[StageRecord] | None = None,
        extras: dict[str, Any] | None = None,
        events: list[Any] | None = None,
        details: dict[str, dict[str, Any]] | None = None,
        usage: UsageTable | None = None,
    ) -> None:
        # One is made for every pipeline call and every fan-out branch: kept to plain assignments.
        # A plain dict until read (a StageKeyed costs more to make; see stage_outputs).
        self._outputs: dict[Any, Any] = {} if stage_outputs is None else stage_outputs
        self._trace: list[Any] = [] if trace is None else trace
        self.extras: dict[str, Any] = {} if extras is None else extras
        self.events: list[Any] = [] if events is None else events
        self._details: dict[Any, Any] = {} if details is None else details
        self._usage = usage  # made on first use: a fan-out branch's run usually never needs one
        self._lazy_trace = -1  # index of the first joined run not expanded in _trace (-1: none)
        self._lazy_outputs = False
        self._lazy_details = False
        self._failed: bool | None = None  # (see stageflow.engine.inline: failed outputs at any depth)
        # An in-line nested run (stageflow.engine.inline): its call while its context is not set up
        # yet, and the context variables' tokens once it is.
        self._pending: Any = None
        self._tokens: Any = None

    @classmethod
    def blank(cls, usage: UsageTable | None) -> RunInfo:
        """``RunInfo(usage=usage)``, for the engine's hot paths (no arguments to look at).

        >>> table = UsageTable()
        >>> RunInfo.blank(table) == RunInfo(usage=table)
        True
        """
        run = _new(cls)
        run._outputs = {}
        run._trace = []
        run.extras = {}
        run.events = []
        run._details = {}
        run._usage = usage
        run._lazy_trace = -1
        run._lazy_outputs = run._lazy_details = False
        run._failed = run._pending = run._tokens = None
        return run

    @property
    def usage(self) -> UsageTable:
        usage = self._usage
        if usage is None:
            usage = self._usage = UsageTable()
        return usage

    @usage.setter
    def usage(self, value: UsageTable) -> None:
        self._usage = value

    @property
    def stage_outputs(self) -> dict[str, Any]:
        outputs = self._outputs
        if type(outputs) is dict:  # the first read: the tutorial's stage names work from here on
            outputs = self._outputs = StageKeyed(outputs)
        if self._lazy_outputs:
            self._lazy_outputs = False
            items = list(outputs.items())
            outputs.clear()  # the same dict, refilled: a reference taken earlier stays right
            _put_outputs(items, "", outputs)
        return outputs

    @stage_outputs.setter
    def stage_outputs(self, value: dict[str, Any]) -> None:
        self._outputs, self._lazy_outputs = value, False

    @property
    def trace(self) -> list[StageRecord]:
        start = self._lazy_trace
        if start >= 0:
            self._lazy_trace = -1
            records: list[Any] = []
            _put_records(self._trace[start:], "", records)
            self._trace[start:] = records
        return self._trace

    @trace.setter
    def trace(self, value: list[StageRecord]) -> None:
        self._trace, self._lazy_trace = value, -1

    @property
    def details(self) -> dict[str, dict[str, Any]]:
        if self._lazy_details:
            self._lazy_details = False
            items = list(self._details.items())
            self._details.clear()
            _put_details(items, "", self._details)
        return self._details

    @details.setter
    def details(self, value: dict[str, dict[str, Any]]) -> None:
        self._details, self._lazy_details = value, False

    def absorb(self, prefix: str, other: RunInfo) -> None:
        """Add a nested pipeline's (or a fan-out branch's) run to this one, its paths under ``prefix``."""
        if prefix:
            joined = tuple.__new__(_Joined, (prefix, other))
            if self._lazy_trace < 0:
                self._lazy_trace = len(self._trace)
            self._trace.append(joined)
            self._outputs[joined] = None  # (keeps the place of the nested outputs among the keys)
            self._details[joined] = None
            self._lazy_outputs = self._lazy_details = True
        else:  # a fan-out branch: its paths are already this run's
            if other._lazy_trace >= 0 and self._lazy_trace < 0:
                self._lazy_trace = len(self._trace) + other._lazy_trace
            self._trace.extend(other._trace)
            self._outputs.update(other._outputs)
            self._lazy_outputs = self._lazy_outputs or other._lazy_outputs
            if other._details:
                self._details.update(other._details)
                self._lazy_details = self._lazy_details or other._lazy_details
        if other.events:
            self.events.extend(other.events)
        used = other._usage
        if used is not None and used._by_path:  # (UsageTable.absorb's own test, without the call when empty)
            self.usage.absorb(prefix, used)

    def absorb_usage(self, other: RunInfo) -> None:
        """Add only the LM usage ``other`` (a fan-out branch's run) has recorded so far, its paths
        already this run's: what a fan-out that raised keeps of a branch that may still be running
        (its usage table is copied under its lock; the rest of its run may still be written)."""
        used = other._usage
        if used is not None and used._by_path:
            self.usage.absorb("", used)

    def _fields(self) -> tuple[Any, ...]:
        return (self.stage_outputs, self.trace, self.extras, self.events, self.details, self.usage)

    def __eq__(self, other: object) -> bool:
        if type(other) is not RunInfo:
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"RunInfo(stage_outputs={self.stage_outputs!r}, trace={self.trace!r}, extras={self.extras!r}, "
            f"events={self.events!r}, details={self.details!r}, usage={self.usage!r})"
        )


def _put_records(records: list[Any], head: str, out: list[Any]) -> None:
    for r in records:
        if type(r) is _Joined:
            if len(r) == 3:  # (the nested pipeline's own record)
                out.append(tuple.__new__(StageRecord, (head + r[0], r[2], True)))
            _put_records(list(r[1]._trace), f"{head}{r[0]}.", out)
        elif head:
            out.append(tuple.__new__(StageRecord, (head + r[0], r[1], r[2])))
        else:
            out.append(r)


def _put_outputs(items: list[tuple[Any, Any]], head: str, out: dict[str, Any]) -> None:
    for k, v in items:
        if type(k) is _Joined:
            _put_outputs(list(k[1]._outputs.items()), f"{head}{k[0]}.", out)
        else:
            out[head + k] = v


def _put_details(items: list[tuple[Any, Any]], head: str, out: dict[str, Any]) -> None:
    """``head`` is the enclosing path without a trailing dot (``""`` at the top)."""
    for k, v in items:
        if type(k) is _Joined:
            prefix, joined = k[0], k[1]
            path = f"{head}.{prefix}" if head else prefix
            if joined.extras:
                out[path] = joined.extras
            _put_details(list(joined._details.items()), path, out)
        else:
            out[(f"{head}.{k}" if k else head) if head else k] = v


#: Run details every result answers, computed on demand (a field of the same name wins).
_COMPUTED = ("output", "final_state", "result", "predictions")


class Result(dspy.Prediction):  # type: ignore[misc]
    """A pipeline's result: a ``dspy.Prediction`` whose fields are the final state.

    Run details are attributes, not fields, so ``keys()``, metrics and nesting see only data:
    ``result.stage_outputs``, ``result.trace``, ``result.run``, and pattern extras such as
    ``result.route_decision`` or ``result.converged`` (looked up after the fields). As in the
    architecture tutorial, ``result.output``, ``result.final_state`` and ``result.predictions`` are the
    final state as a dict, and ``result.result`` is what the pattern ran (a branch's or a chosen
    structure's result; the final state otherwise). A field of the same name always wins.

    Examples:
        >>> r = Result({"answer": "42"})
        >>> r.answer, r.output, r.keys()
        ('42', {'answer': '42'}, ['answer'])
    """

    def __init__(self, state: dict[str, Any] | None = None, run: RunInfo | None = None, **kwargs: Any):
        # What dspy.Prediction.__init__ sets up (its store, completions and usage), done directly: a
        # result is built on every pipeline call, and Example's generic __setattr__ is slow.
        store = dict(state) if state else {}
        if kwargs:
            store.update(kwargs)
        d = self.__dict__
        d["_store"] = store
        d["_completions"] = None
        d["_lm_usage"] = None
        d["_run"] = run if run is not None else RunInfo()

    @classmethod
    def of(cls, state: dict[str, Any], run: RunInfo) -> Result:
        """``Result(state, run)`` that keeps ``state`` as its store instead of copying it (for a
        state nothing else holds: a finished nested run's).

        >>> Result.of({"answer": "42"}, RunInfo()).answer
        '42'
        """
        result = cls.__new__(cls)
        d = result.__dict__
        d["_store"] = state
        d["_completions"] = None
        d["_lm_usage"] = None
        d["_run"] = run
        return result

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        store = self.__dict__.get("_store")
        if store is not None and key in store:
            return store[key]
        run = self.__dict__.get("_run")
        if run is not None and key in run.extras:
            return run.extras[key]
        if key in _COMPUTED and store is not None:
            return dict(store)
        if key == "failed_outputs" and run is not None:  # failed stages of nested pipelines
            # (empty when nothing failed: `if result.failed_outputs:` is the check to write)
            return {
                f: why
                for details in run.details.values()
                for f, why in (details.get(key) or {}).items()
                if store is None or f not in store
            }
        fields = list(store) if store is not None else []
        extras = [*(list(run.extras) if run is not None else []), *_COMPUTED]
        raise AttributeError(
            f"Result has no field or run detail {key!r}. Fields: {fields}; details: {extras}."
        )

    @property
    def run(self) -> RunInfo:
        """All run details of this call."""
        return self.__dict__["_run"]  # type: ignore[no-any-return]

    @property
    def stage_outputs(self) -> dict[str, Any]:
        """Each stage's raw output, by full stage path (nested stages included; the last one in loops).
        The tutorial's names work too: ``result.stage_outputs["stage_0"]`` is ``["stages[0]"]``."""
        return self.run.stage_outputs

    @property
    def trace(self) -> StageTrace:
        """The stages that ran, in order, with their wall time; ``result.trace[name]`` is a stage's
        output, as in the tutorial (where ``trace`` is the outputs by stage name)."""
        run = self.run
        outputs = (
            run.stage_outputs if isinstance(run.stage_outputs, StageKeyed) else StageKeyed(run.stage_outputs)
        )
        return StageTrace(run.trace, outputs)

    @property
    def details(self) -> dict[str, dict[str, Any]]:
        """Run details of nested pipelines by stage path, this pipeline's own under ``""``.

        ``result.details["stages[1]"]["item_errors"]`` reads a nested ForEach's failed items.
        """
        return {"": self.run.extras, **self.run.details}

    def copy(self, **kwargs: Any) -> Result:
        """A result with the same fields (``kwargs`` add or replace some) and the same run details, as
        ``dspy.Prediction.copy`` copies a prediction's fields.

        >>> Result({"a": 1}).copy(b=2).keys()
        ['a', 'b']
        """
        return Result({**self.__dict__["_store"], **kwargs}, self.__dict__["_run"])
