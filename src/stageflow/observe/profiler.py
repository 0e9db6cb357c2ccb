"""Per-stage timing and sizes, collected through the engine hooks.

Examples:
    >>> import stageflow
    >>> p = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x * 2}, writes=["y"])])
    >>> with stageflow.profile() as prof:
    ...     _ = p(x=2)
    ...     _ = p(x=3)
    >>> prof.get_performance_summary()["stages[0]"]["num_executions"]
    2
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from stageflow.engine.hooks import Hook, attach_hooks

__all__ = ["Profiler", "StageStats", "profile", "value_size"]


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


@dataclass
class StageStats:
    """Running statistics of one stage path."""

    times: list[float] = field(default_factory=list)
    input_sizes: list[int] = field(default_factory=list)
    output_sizes: list[int] = field(default_factory=list)
    errors: int = 0

    def summary(self) -> dict[str, Any]:
        n = len(self.times)
        total = sum(self.times)
        return {
            "num_executions": n,
            "errors": self.errors,
            "total_time": total,
            "avg_time": total / n if n else 0.0,
            "min_time": min(self.times) if n else 0.0,
            "max_time": max(self.times) if n else 0.0,
            "avg_input_size": sum(self.input_sizes) / n if n else 0.0,
            "avg_output_size": sum(self.output_sizes) / len(self.output_sizes) if self.output_sizes else 0.0,
        }


class Profiler(Hook):
    """Collects per-stage wall times (monotonic clock) and input/output sizes; thread-safe.

    Attach it to any pipeline run with :func:`profile` or ``attach_hooks(profiler)``. Paths are
    full stage paths, so nested stages are reported individually (a nested pipeline's own time
    includes its children).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats: dict[str, StageStats] = {}
        self.runs = 0

    def __deepcopy__(self, memo: dict[int, Any]) -> Profiler:
        return Profiler()  # a copied program starts with empty statistics

    def on_run_start(self, *, path: str, **future: Any) -> None:
        if not path:
            with self._lock:
                self.runs += 1

    def after_stage(
        self, *, path: str, inputs: dict[str, Any], outputs: Any, elapsed: float, **future: Any
    ) -> None:
        in_size, out_size = value_size(inputs), value_size(outputs)
        with self._lock:
            s = self._stats.setdefault(path, StageStats())
            s.times.append(elapsed)
            s.input_sizes.append(in_size)
            s.output_sizes.append(out_size)

    def on_stage_error(self, *, path: str, inputs: dict[str, Any], elapsed: float, **future: Any) -> None:
        in_size = value_size(inputs)
        with self._lock:
            s = self._stats.setdefault(path, StageStats())
            s.times.append(elapsed)
            s.input_sizes.append(in_size)
            s.errors += 1

    def get_performance_summary(self) -> dict[str, dict[str, Any]]:
        """``{stage_path: {avg_time, total_time, num_executions, min_time, max_time, ...}}``."""
        with self._lock:
            return {path: s.summary() for path, s in self._stats.items()}

    def merge(self, other: Profiler) -> None:
        """Add another profiler's records to this one."""
        with other._lock:
            items = [
                (p, StageStats(list(s.times), list(s.input_sizes), list(s.output_sizes), s.errors))
                for p, s in other._stats.items()
            ]
            runs = other.runs
        with self._lock:
            self.runs += runs
            for path, s in items:
                mine = self._stats.setdefault(path, StageStats())
                mine.times += s.times
                mine.input_sizes += s.input_sizes
                mine.output_sizes += s.output_sizes
                mine.errors += s.errors

    def reset(self) -> None:
        """Forget everything recorded so far."""
        with self._lock:
            self._stats.clear()
            self.runs = 0


@contextlib.contextmanager
def profile(profiler: Profiler | None = None) -> Iterator[Profiler]:
    """Profile every pipeline run inside the block (nested and concurrent ones included)."""
    prof = profiler or Profiler()
    with attach_hooks(prof):
        yield prof
