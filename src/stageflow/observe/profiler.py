"""Per-stage time, sizes and usage (LM calls, tokens, cost, cache hits, retries, repairs) of pipeline
runs, each run's critical path and the time a perfect parallel schedule would take.

Everything is collected through the engine hooks; :meth:`Profiler.table` prints it,
:meth:`Profiler.to_dict` returns it as JSON-ready data.

Examples:
    >>> import stageflow
    >>> p = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x * 2}, writes=["y"])])
    >>> with stageflow.profile() as prof:
    ...     _ = p(x=2)
    ...     _ = p(x=3)
    >>> prof.get_performance_summary()["stages[0]"]["num_executions"]
    2
    >>> [step.path for step in prof.last_run.critical_path]
    ['stages[0]']
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

from stageflow.engine.hooks import Hook, attach_hooks
from stageflow.observe.profile_table import render_table
from stageflow.observe.redact import redact_text
from stageflow.observe.schedule import CriticalStep, SpanNode, critical_path, critical_time, ideal_time
from stageflow.usage import StageUsage

__all__ = ["Profiler", "RunProfile", "StageStats", "profile", "value_size"]


def value_size(value: Any) -> int:
    """A cheap size of a stage's inputs or outputs: characters of the values' text."""
    if isinstance(value, Mapping):
        return sum(value_size(v) for v in value.values())
    store = getattr(value, "_store", None)
    if isinstance(store, dict):
        return sum(value_size(v) for v in store.values())
    if isinstance(value, list | tuple):
        return sum(value_size(v) for v in value)
    return len(value) if isinstance(value, str) else len(str(value))


def _usage_of(data: Mapping[str, Any] | None) -> StageUsage | None:
    if not data:
        return None
    known = StageUsage().to_dict()
    return StageUsage(**{k: v for k, v in data.items() if k in known})


@dataclass
class StageStats:
    """Running statistics of one stage path (every call of it, a failed call included).

    ``usage`` adds up what each call used; for a stage that is itself a pipeline that includes
    its nested stages.
    """

    times: list[float] = field(default_factory=list)
    input_sizes: list[int] = field(default_factory=list)
    output_sizes: list[int] = field(default_factory=list)
    errors: int = 0
    usage: StageUsage = field(default_factory=StageUsage)
    #: Calls stopped from outside — cancelled (a fail-fast fan-out's other branches, a quorum, a
    #: timeout, Ctrl-C) or left running and refused their LM calls — not counted as ``errors``.
    cancelled: int = 0

    def summary(self) -> dict[str, Any]:
        """``num_executions``, ``errors``, ``cancelled``, times (seconds), average sizes, and the
        usage fields."""
        n = len(self.times)
        total = sum(self.times)
        return {
            "num_executions": n,
            "errors": self.errors,
            "cancelled": self.cancelled,
            "total_time": total,
            "avg_time": total / n if n else 0.0,
            "min_time": min(self.times) if n else 0.0,
            "max_time": max(self.times) if n else 0.0,
            "avg_input_size": sum(self.input_sizes) / n if n else 0.0,
            "avg_output_size": sum(self.output_sizes) / len(self.output_sizes) if self.output_sizes else 0.0,
            **self.usage.to_dict(),
            "total_tokens": self.usage.total_tokens,
        }

    def copy(self) -> StageStats:
        """An independent copy."""
        return StageStats(
            list(self.times),
            list(self.input_sizes),
            list(self.output_sizes),
            self.errors,
            StageUsage(**self.usage.to_dict()),
            self.cancelled,
        )

    def add(self, other: StageStats) -> None:
        """Add ``other``'s records to these."""
        self.times += other.times
        self.input_sizes += other.input_sizes
        self.output_sizes += other.output_sizes
        self.errors += other.errors
        self.cancelled += other.cancelled
        self.usage.add(other.usage)


@dataclass(frozen=True)
class RunProfile:
    """One pipeline call as the profiler saw it (times in seconds).

    Attributes:
        wall: The call's wall time.
        critical_path: The longest chain of stages that ran one after another, in order (see
            :mod:`stageflow.observe.schedule`).
        critical_time: Their times added up (the rest of ``wall`` went to the pipelines themselves);
            always ``ideal_time <= critical_time <= wall``.
        ideal_time: What a perfect parallel schedule would take: unlimited workers, no framework
            cost (see :mod:`stageflow.observe.schedule` for the exact definition).
        stage_calls: How many stage calls the run made (nested ones included).
        usage: What the run used (its top-level stages' usage added up).
        error: ``"<Type>: message"`` when the call failed.
    """

    wall: float
    critical_path: tuple[CriticalStep, ...]
    critical_time: float
    ideal_time: float
    stage_calls: int
    usage: StageUsage
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "wall": self.wall,
            "critical_path": [s.to_dict() for s in self.critical_path],
            "critical_time": self.critical_time,
            "ideal_time": self.ideal_time,
            "stage_calls": self.stage_calls,
            "usage": self.usage.to_dict(),
            "error": self.error,
        }


def _end_unfinished(node: SpanNode, end: float) -> None:
    """Stages still running when their run ended (cancelled or abandoned branches, which report no
    end) count as running until then, stopped from outside."""
    for child in node.children:
        if child.end < child.start:
            child.end = end
            child.cancelled = True
        _end_unfinished(child, end)


class _Open:
    """A span being recorded: the run (``is_run``) or a stage call inside it."""

    __slots__ = ("calls", "ended", "is_run", "node", "parent", "token", "usage")

    def __init__(self, node: SpanNode, parent: _Open | None, is_run: bool) -> None:
        self.node = node
        self.parent = parent
        self.is_run = is_run
        self.token: Token[_Open | None] | None = None
        self.usage = StageUsage() if is_run else None
        self.calls = [0] if is_run else None
        self.ended = False  # (a run: its profile is kept; what its stages report later adds to it)


class Profiler(Hook):
    """Collects per-stage wall times (monotonic clock), input/output sizes and usage; thread-safe.

    Attach it to any pipeline run with :func:`profile` or ``attach_hooks(profiler)``. Paths are
    full stage paths, so nested stages are reported individually (a nested pipeline's own time and
    usage include its children's).

    Args:
        keep_runs: How many of the most recent runs' profiles (critical path, ideal time) to keep.
    """

    def __init__(self, *, keep_runs: int = 100) -> None:
        self._lock = threading.Lock()
        self._stats: dict[str, StageStats] = {}
        self._runs: deque[RunProfile] = deque(maxlen=keep_runs)
        self._keep_runs = keep_runs
        self._current: ContextVar[_Open | None] = ContextVar("stageflow_profiler_span", default=None)
        self.runs = 0
        self._wall = 0.0
        self._usage = StageUsage()

    def __deepcopy__(self, memo: dict[int, Any]) -> Profiler:
        return Profiler(keep_runs=self._keep_runs)  # a copied program starts with empty statistics

    # -- spans --------------------------------------------------------------------------------------
    def _open(self, path: str, is_run: bool) -> None:
        parent = self._current.get()
        node = SpanNode(path, time.perf_counter(), 0.0)
        if parent is not None:
            parent.node.children.append(node)  # list.append: atomic, branches may finish in any order
        frame = _Open(node, parent, is_run)
        frame.token = self._current.set(frame)

    def _close(self, path: str, is_run: bool, elapsed: float | None) -> _Open | None:
        frame = self._current.get()
        if frame is None or frame.node.path != path or frame.is_run != is_run:
            return None  # opened before this profiler was attached
        # The engine's own measure of the call, so the schedule adds up the table's numbers.
        node = frame.node
        node.end = node.start + elapsed if elapsed is not None else time.perf_counter()
        self._current.reset(frame.token)  # type: ignore[arg-type]
        return frame

    @staticmethod
    def _run_of(frame: _Open) -> _Open | None:
        parent = frame.parent
        while parent is not None and not parent.is_run:
            parent = parent.parent
        return parent

    # -- hooks --------------------------------------------------------------------------------------
    def on_run_start(self, *, path: str, **future: Any) -> None:
        if path or self._current.get() is not None:
            # A pipeline nested in one being profiled (also one a stage's code runs in a thread of
            # dspy.Parallel, where this context is not: its path is the stage's): its stages join that run.
            return
        with self._lock:
            self.runs += 1
        self._open(path, True)

    def on_run_end(
        self, *, path: str, error: BaseException | None = None, elapsed: float | None = None, **future: Any
    ) -> None:
        frame = self._current.get()
        if frame is None or not frame.is_run or frame.node.path != path:
            return
        self._close(path, True, elapsed)
        root = frame.node
        _end_unfinished(root, root.end)
        usage = frame.usage or StageUsage()
        path_steps = tuple(critical_path(root))
        profile = RunProfile(
            wall=root.elapsed,
            critical_path=path_steps,
            critical_time=critical_time(root),
            ideal_time=ideal_time(root),
            stage_calls=(frame.calls or [0])[0],
            usage=usage,
            error=None if error is None else redact_text(f"{type(error).__name__}: {error}"),
        )
        with self._lock:
            self._runs.append(profile)
            self._wall += profile.wall
            self._usage.add(usage)
            frame.ended = True

    def before_stage(self, *, path: str, **future: Any) -> None:
        with self._lock:
            if path not in self._stats:
                self._stats[path] = StageStats()  # first seen here: the table lists stages in run order
        self._open(path, False)

    def _record(
        self,
        path: str,
        elapsed: float,
        in_size: int,
        out_size: int | None,
        usage: Any,
        cancelled: bool = False,
    ) -> None:
        frame = self._close(path, False, elapsed)
        if cancelled and frame is not None:
            frame.node.cancelled = True  # (not on the critical path: what stopped it decided)
        used = _usage_of(usage)
        with self._lock:
            s = self._stats.setdefault(path, StageStats())
            s.times.append(elapsed)
            s.input_sizes.append(in_size)
            if cancelled:
                s.cancelled += 1
            elif out_size is None:
                s.errors += 1
            else:
                s.output_sizes.append(out_size)
            if used is not None:
                s.usage.add(used)
            run = self._run_of(frame) if frame is not None else None
            if run is not None and run.calls is not None:
                run.calls[0] += 1
                if used is not None and run.usage is not None and frame is not None and frame.parent is run:
                    run.usage.add(used)
                    if run.ended:  # (a stage left running, ended after its run: the totals too)
                        self._usage.add(used)

    def after_stage(
        self, *, path: str, inputs: dict[str, Any], outputs: Any, elapsed: float, **future: Any
    ) -> None:
        self._record(path, elapsed, value_size(inputs), value_size(outputs), future.get("usage"))

    def on_stage_error(self, *, path: str, inputs: dict[str, Any], elapsed: float, **future: Any) -> None:
        # (stopped from outside, or a refused LM call of work whose caller gave up: the engine says so)
        self._record(
            path, elapsed, value_size(inputs), None, future.get("usage"), future.get("cancelled") is True
        )

    # -- results ------------------------------------------------------------------------------------
    def get_performance_summary(self) -> dict[str, dict[str, Any]]:
        """``{stage_path: {avg_time, total_time, num_executions, min_time, max_time, errors, cancelled,
        avg_input_size, avg_output_size, lm_calls, input_tokens, output_tokens, total_tokens, cost,
        lm_cache_hits, cache_hits, retries, repairs}}``, stages in the order they first ran."""
        with self._lock:
            return {path: s.summary() for path, s in self._stats.items() if s.times}

    @property
    def last_run(self) -> RunProfile | None:
        """The most recent finished pipeline call's profile (``None`` before any)."""
        with self._lock:
            return self._runs[-1] if self._runs else None

    @property
    def run_profiles(self) -> list[RunProfile]:
        """The most recent runs' profiles, oldest first (at most ``keep_runs``)."""
        with self._lock:
            return list(self._runs)

    def totals(self) -> dict[str, Any]:
        """Over every profiled call: ``runs``, ``wall`` (seconds) and the usage fields."""
        with self._lock:
            return {"runs": self.runs, "wall": self._wall, **self._usage.to_dict()}

    def to_dict(self) -> dict[str, Any]:
        """Everything as JSON-ready data: ``{"totals", "stages", "last_run"}``."""
        last = self.last_run
        return {
            "totals": self.totals(),
            "stages": self.get_performance_summary(),
            "last_run": None if last is None else last.to_dict(),
        }

    def table(self, *, group_items: bool = True) -> str:
        """A plain-text table: one row per stage path (time, calls, LM calls, tokens, cost, cache
        hits, retries, repairs, errors), totals, and the last run's critical path and ideal time.

        Args:
            group_items: Add ForEach items up into one row per ForEach (``stage[*]``).
        """
        return render_table(self.get_performance_summary(), self.totals(), self.last_run, group_items)

    def merge(self, other: Profiler) -> None:
        """Add another profiler's records to this one."""
        with other._lock:
            items = [(p, s.copy()) for p, s in other._stats.items()]
            runs, wall, profiles = other.runs, other._wall, list(other._runs)
            usage = StageUsage(**other._usage.to_dict())
        with self._lock:
            self.runs += runs
            self._wall += wall
            self._usage.add(usage)
            self._runs.extend(profiles)
            for path, s in items:
                self._stats.setdefault(path, StageStats()).add(s)

    def reset(self) -> None:
        """Forget everything recorded so far."""
        with self._lock:
            self._stats.clear()
            self._runs.clear()
            self.runs = 0
            self._wall = 0.0
            self._usage = StageUsage()


@contextlib.contextmanager
def profile(profiler: Profiler | None = None) -> Iterator[Profiler]:
    """Profile every pipeline run inside the block (nested and concurrent ones included)."""
    prof = profiler or Profiler()
    with attach_hooks(prof):
        yield prof
