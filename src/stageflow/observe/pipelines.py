"""``ProfilingPipeline`` and ``TracingPipeline``: a :class:`SequentialPipeline` plus an observer.

They are the tutorial's conveniences, with its names and data layouts (``stage_0``, the
``profile_data`` lists, the ``execution_trace`` entries, ``save_trace(filename)``), built on the
engine's hooks: the stage loop is the engine's, and the observers are the same :class:`Profiler` /
:class:`Tracer` that ``stageflow.profile()`` / ``stageflow.trace()`` attach to any pipeline (kept as
``pipeline.profiler`` / ``pipeline.tracer`` for the richer views: usage, spans, HTML reports).
Unlike the tutorial's versions, a call's own data is in its result and nothing leaks between
concurrent calls; the pipeline keeps the totals (profiles) or the last call (traces).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from stageflow.engine.hooks import Hook
from stageflow.observe.profiler import Profiler
from stageflow.observe.tracer import Tracer
from stageflow.patterns.sequential import SequentialPipeline
from stageflow.state import Result, RunInfo

__all__ = ["ProfilingPipeline", "TracingPipeline", "tutorial_name"]


def tutorial_name(path: str) -> str:
    """The tutorial's name of a stage path: ``stages[2]`` → ``stage_2`` (the rest of a nested path
    is kept: ``stages[1].stages[0]`` → ``stage_1.stages[0]``).

    Examples:
        >>> tutorial_name("stages[2]"), tutorial_name("stages[1].stages[0]"), tutorial_name("")
        ('stage_2', 'stage_1.stages[0]', '')
    """
    if path.startswith("stages[") and "]" in path:
        end = path.index("]")
        index = path[7:end]
        if index.isdigit():
            return f"stage_{index}{path[end + 1 :]}"
    return path


def _relative(path: str, root: str) -> str:
    """``path`` as seen from the pipeline at ``root`` (its own full path; ``""`` at the top), so a
    profiling or tracing pipeline nested in another names its stages as it does alone.

    >>> _relative("stages[1].stages[0]", "stages[1]"), _relative("stages[0]", "")
    ('stages[0]', 'stages[0]')
    """
    return path[len(root) + 1 :] if root and path.startswith(f"{root}.") else path


def _as_dict(value: Any) -> Any:
    store = getattr(value, "_store", None)  # a dspy.Prediction: its fields
    return dict(store) if isinstance(store, dict) else value


class _Timings(Hook):
    """Raw per-stage times and sizes of one call (the tutorial's ``profile_data`` records)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.data: dict[str, list[Any]] = {}
        self.root: str | None = None  # the profiling pipeline's own full path (its run starts first)

    def on_run_start(self, *, path: str, **future: Any) -> None:
        if self.root is None:
            self.root = path

    def _add(self, path: str, elapsed: float, inputs: Any, outputs: Any) -> None:
        name = tutorial_name(_relative(path, self.root or ""))
        # The tutorial's sizes: len(str(...)) of the inputs and of the outputs as a dict.
        sizes = (len(str(dict(inputs))), len(str(_as_dict(outputs))) if outputs is not None else 0)
        with self._lock:
            self.data.setdefault(name, []).append(elapsed)
            self.data.setdefault(f"{name}_sizes", []).append(sizes)

    def after_stage(self, *, path: str, inputs: Any, outputs: Any, elapsed: float, **future: Any) -> None:
        self._add(path, elapsed, inputs, outputs)

    def on_stage_error(self, *, path: str, inputs: Any, elapsed: float, **future: Any) -> None:
        self._add(path, elapsed, inputs, None)


def _summary(data: dict[str, list[Any]]) -> dict[str, dict[str, Any]]:
    """The tutorial's ``get_performance_summary()`` over raw records."""
    out: dict[str, dict[str, Any]] = {}
    for key, times in data.items():
        if key.endswith("_sizes") or not times:
            continue
        total = sum(times)
        out[key] = {
            "avg_time": total / len(times),
            "total_time": total,
            "num_executions": len(times),
            "min_time": min(times),
            "max_time": max(times),
        }
    return out


class ProfilingPipeline(SequentialPipeline):
    """A sequential pipeline that profiles every call (the tutorial's ``ProfilingPipeline``).

    ``result.profile_data`` is that call's raw record in the tutorial's layout:
    ``{"stage_0": [seconds], "stage_0_sizes": [(input_size, output_size)], ...}`` (a stage run
    several times, in a loop, has several entries). ``pipeline.profile_data`` accumulates every call
    so far in the same layout, and ``get_performance_summary()`` summarises it per stage
    (``avg_time``, ``total_time``, ``num_executions``, ``min_time``, ``max_time``). Failed calls
    count too. ``pipeline.profiler`` is a :class:`~stageflow.Profiler` over every call (usage,
    tables); ``reset()`` clears both.
    """

    def __init__(self, stages: Iterable[Any], *, strict: bool | None = None) -> None:
        super().__init__(stages, strict=strict)
        self.profiler = Profiler()
        self._totals: dict[str, list[Any]] = {}
        self._totals_lock = threading.Lock()

    def stageflow_hooks(self) -> tuple[Any, ...]:
        return (_Timings(), Profiler())

    def stageflow_result(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...] = ()) -> Result:
        self._keep(run, hooks)
        return Result(state, run)

    def stageflow_failed(self, run: RunInfo, hooks: tuple[Any, ...], error: BaseException) -> None:
        self._keep(run, hooks)  # a failed call's stages count too (and the stage that failed)

    def _keep(self, run: RunInfo, hooks: tuple[Any, ...]) -> None:
        for hook in hooks:
            if isinstance(hook, Profiler):
                self.profiler.merge(hook)
            elif isinstance(hook, _Timings):
                run.extras["profile_data"] = dict(hook.data)
                with self._totals_lock:
                    for key, values in hook.data.items():
                        self._totals.setdefault(key, []).extend(values)

    @property
    def profile_data(self) -> dict[str, list[Any]]:
        """Every call so far, in the tutorial's layout (see the class docstring)."""
        with self._totals_lock:
            return {k: list(v) for k, v in self._totals.items()}

    def get_performance_summary(self) -> dict[str, dict[str, Any]]:
        """Per-stage statistics over every call so far, by the tutorial's stage names."""
        return _summary(self.profile_data)

    def reset(self) -> None:
        """Clear the accumulated statistics."""
        with self._totals_lock:
            self._totals.clear()
        self.profiler.reset()


def _epoch(event: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(event["timestamp"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return 0.0


def _entries(events: list[dict[str, Any]], names: dict[str, str]) -> list[dict[str, Any]]:
    """Tracer events as the tutorial's ``execution_trace`` entries, paths relative to the tracing
    pipeline (its own run starts first: a nested one names its stages as it does alone)."""
    out: list[dict[str, Any]] = []
    root = events[0].get("stage", "") if events and events[0].get("event") == "input" else ""
    for e in events:
        kind, full = e.get("event"), e.get("stage", "")
        path = "" if full == root else _relative(full, root)
        entry: dict[str, Any] = {"timestamp": _epoch(e)}
        if kind in ("input", "output"):
            outer = not path
            entry["stage"] = kind if outer else tutorial_name(path)
            entry["type"] = kind if outer else f"pipeline_{'start' if kind == 'input' else 'end'}"
            if kind == "input":
                entry["input"] = e.get("inputs")
            else:
                entry["output"] = e.get("outputs")
        else:
            entry["stage"] = tutorial_name(path)
            entry["stage_name"] = names.get(path) or e.get("stage_type") or tutorial_name(path)
            entry["type"] = kind
            if kind == "stage_start":
                entry["input"] = e.get("inputs")
            elif kind == "stage_end":
                entry["output"] = e.get("outputs")
        for extra in ("elapsed", "error", "usage"):
            if extra in e:
                entry[extra] = e[extra]
        entry["path"] = full
        out.append(entry)
    return out


class TracingPipeline(SequentialPipeline):
    """A sequential pipeline that traces every call (the tutorial's ``TracingPipeline``).

    ``result.execution_trace`` is that call's trace in the tutorial's layout: entries with
    ``timestamp`` (seconds since the epoch), ``stage`` (``"input"``, ``"stage_0"``..., ``"output"``),
    ``type`` (``input``, ``stage_start``, ``stage_end``, ``stage_error``, ``output``), ``stage_name``,
    and ``input`` / ``output``. ``pipeline.execution_trace`` and ``save_trace(filename)`` (JSON, a
    list of those entries, as the tutorial writes it) are the last finished call's — a failed call
    included, its trace ending with the error. ``pipeline.tracer`` is that call's
    :class:`~stageflow.Tracer` (spans, usage; ``pipeline.tracer.save(path)`` is what
    ``stageflow report`` reads).
    """

    def __init__(
        self, stages: Iterable[Any], *, record_content: bool = True, strict: bool | None = None
    ) -> None:
        super().__init__(stages, strict=strict)
        self.record_content = record_content
        self.tracer = Tracer(record_content=record_content)
        self._last: list[dict[str, Any]] = []

    def stageflow_hooks(self) -> tuple[Any, ...]:
        return (Tracer(record_content=self.record_content),)

    def stageflow_result(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...] = ()) -> Result:
        self._keep(run, hooks)
        return Result(state, run)

    def stageflow_failed(self, run: RunInfo, hooks: tuple[Any, ...], error: BaseException) -> None:
        self._keep(run, hooks)  # the events up to the failure, the error included

    def _names(self) -> dict[str, str]:
        return {f"stages[{i}]": getattr(s, "name", None) or f"Stage {i}" for i, s in enumerate(self.stages)}

    def _keep(self, run: RunInfo, hooks: tuple[Any, ...]) -> None:
        for tracer in hooks:
            if isinstance(tracer, Tracer):
                entries = _entries(list(tracer.events), self._names())
                run.extras["execution_trace"] = entries
                self._last = entries  # one reference swap each: safe under concurrent calls
                self.tracer = tracer

    @property
    def execution_trace(self) -> list[dict[str, Any]]:
        """The last finished call's trace (each call's own is ``result.execution_trace``)."""
        return list(self._last)

    def save_trace(self, filename: str | os.PathLike[str]) -> Path:
        """Write the last finished call's trace to ``filename``: a JSON list of its entries."""
        from stageflow.outfile import write_text

        target = Path(filename)
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self._last, indent=2, default=str, ensure_ascii=False)
        write_text(target, text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), "the trace")
        return target
