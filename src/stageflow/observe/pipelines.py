"""``ProfilingPipeline`` and ``TracingPipeline``: a :class:`SequentialPipeline` plus an observer.

They are thin conveniences: the stage loop is the engine's, and the observers are the same
:class:`Profiler` / :class:`Tracer` that ``stageflow.profile()`` / ``stageflow.trace()`` attach to
any pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stageflow.observe.profiler import Profiler
from stageflow.observe.tracer import Tracer
from stageflow.patterns.sequential import SequentialPipeline
from stageflow.state import Result, RunInfo

__all__ = ["ProfilingPipeline", "TracingPipeline"]


class ProfilingPipeline(SequentialPipeline):
    """A sequential pipeline that profiles every call.

    ``get_performance_summary()`` aggregates all calls so far (per stage path: ``avg_time``,
    ``total_time``, ``num_executions``, ``min_time``, ``max_time``, input/output sizes);
    ``result.profile_data`` holds the same summary for that call alone; ``reset()`` clears.
    """

    def __init__(self, stages: Iterable[Any], *, strict: bool | None = None) -> None:
        super().__init__(stages, strict=strict)
        self.profiler = Profiler()

    def stageflow_hooks(self) -> tuple[Any, ...]:
        return (Profiler(),)

    def stageflow_result(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...] = ()) -> Result:
        self._keep(run, hooks)
        return Result(state, run)

    def stageflow_failed(self, run: RunInfo, hooks: tuple[Any, ...], error: BaseException) -> None:
        self._keep(run, hooks)  # a failed call's stages count too (and the stage that failed, as an error)

    def _keep(self, run: RunInfo, hooks: tuple[Any, ...]) -> None:
        for per_run in hooks:
            if isinstance(per_run, Profiler):
                self.profiler.merge(per_run)
                run.extras["profile_data"] = per_run.get_performance_summary()

    @property
    def profile_data(self) -> dict[str, dict[str, Any]]:
        """Per-stage statistics over every call so far (as :meth:`get_performance_summary`)."""
        return self.get_performance_summary()

    def get_performance_summary(self) -> dict[str, dict[str, Any]]:
        """Per-stage statistics over every call so far."""
        return self.profiler.get_performance_summary()

    def reset(self) -> None:
        """Clear the aggregated statistics."""
        self.profiler.reset()


class TracingPipeline(SequentialPipeline):
    """A sequential pipeline that traces every call.

    ``result.execution_trace`` holds that call's events; ``save_trace(path)`` writes the most
    recently finished call's events as JSON (a call that failed included: its events end with the
    error, and ``error.run.extras["execution_trace"]`` has them too).
    """

    def __init__(
        self, stages: Iterable[Any], *, record_content: bool = True, strict: bool | None = None
    ) -> None:
        super().__init__(stages, strict=strict)
        self.record_content = record_content
        self._last = Tracer(record_content=record_content)

    def stageflow_hooks(self) -> tuple[Any, ...]:
        return (Tracer(record_content=self.record_content),)

    def stageflow_result(self, state: dict[str, Any], run: RunInfo, hooks: tuple[Any, ...] = ()) -> Result:
        self._keep(run, hooks)
        return Result(state, run)

    def stageflow_failed(self, run: RunInfo, hooks: tuple[Any, ...], error: BaseException) -> None:
        self._keep(run, hooks)  # the events up to the failure, the error included

    def _keep(self, run: RunInfo, hooks: tuple[Any, ...]) -> None:
        for tracer in hooks:
            if isinstance(tracer, Tracer):
                run.extras["execution_trace"] = list(tracer.events)
                self._last = tracer  # one reference swap: atomic, safe under concurrent calls

    @property
    def execution_trace(self) -> list[dict[str, Any]]:
        """The events of the last finished call (each call's own are ``result.execution_trace``)."""
        return list(self._last.events)

    def save_trace(self, path: str | os.PathLike[str]) -> Path:
        """Write the last finished call's events to ``path`` (JSON)."""
        return self._last.save(path)
