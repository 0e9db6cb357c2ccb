"""Ordered, timestamped run events collected through the engine hooks, saved as JSON.

Events: ``input`` (a pipeline call starts), ``stage_start``, ``stage_end``, ``stage_error`` and
``output`` (a pipeline call ends), each with the full stage path, ``t`` (seconds since the tracer
started, monotonic) and ``timestamp`` (wall clock, ISO 8601, UTC).

Examples:
    >>> import stageflow
    >>> p = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x + 1}, writes=["y"])])
    >>> with stageflow.trace() as tracer:
    ...     _ = p(x=1)
    >>> [e["event"] for e in tracer.events]
    ['input', 'stage_start', 'stage_end', 'output']
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stageflow.engine.hooks import Hook, attach_hooks

__all__ = ["Tracer", "jsonable", "trace"]


def jsonable(value: Any, limit: int = 2000) -> Any:
    """A JSON-safe copy of ``value`` (long strings cut to ``limit`` characters)."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "…"
    store = getattr(value, "_store", None)
    if isinstance(store, dict):
        value = store
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v, limit) for v in value]
    if hasattr(value, "model_dump"):
        return jsonable(value.model_dump(), limit)
    return jsonable(repr(value), limit)


class Tracer(Hook):
    """Records run events in order; thread-safe.

    Args:
        record_content: Include stage inputs and outputs in the events (default ``True``); turn it
            off when they hold data that must not be written to disk.
    """

    def __init__(self, *, record_content: bool = True) -> None:
        self.record_content = record_content
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self.events: list[dict[str, Any]] = []

    def __deepcopy__(self, memo: dict[int, Any]) -> Tracer:
        return Tracer(record_content=self.record_content)

    def _emit(self, event: str, path: str, **data: Any) -> None:
        record = {
            "event": event,
            "stage": path,
            "t": round(time.perf_counter() - self._t0, 9),
            "timestamp": datetime.now(UTC).isoformat(),
            "thread": threading.get_ident(),
        }
        for k, v in data.items():
            if k in ("inputs", "outputs") and not self.record_content:
                continue
            record[k] = jsonable(v)
        with self._lock:
            self.events.append(record)

    def on_run_start(self, *, path: str, pipeline: Any, inputs: dict[str, Any], **future: Any) -> None:
        self._emit("input", path, pipeline=type(pipeline).__name__, inputs=inputs)

    def on_run_end(
        self,
        *,
        path: str,
        pipeline: Any,
        outputs: Any,
        error: BaseException | None,
        elapsed: float,
        **future: Any,
    ) -> None:
        extra: dict[str, Any] = {"elapsed": elapsed, "pipeline": type(pipeline).__name__}
        if error is not None:
            extra["error"] = f"{type(error).__name__}: {error}"
        self._emit("output", path, outputs=outputs, **extra)

    def before_stage(self, *, path: str, stage: Any, inputs: dict[str, Any], **future: Any) -> None:
        self._emit("stage_start", path, stage_type=type(stage).__name__, inputs=inputs)

    def after_stage(self, *, path: str, outputs: Any, elapsed: float, **future: Any) -> None:
        self._emit("stage_end", path, elapsed=elapsed, outputs=outputs)

    def on_stage_error(self, *, path: str, error: BaseException, elapsed: float, **future: Any) -> None:
        self._emit("stage_error", path, elapsed=elapsed, error=f"{type(error).__name__}: {error}")

    def to_json(self) -> str:
        """The events as a JSON document ``{"events": [...]}``."""
        with self._lock:
            events = list(self.events)
        return json.dumps({"events": events}, indent=2, ensure_ascii=False)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` atomically (a temp file, then a rename)."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.to_json())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return target

    def reset(self) -> None:
        """Drop recorded events and restart the clock."""
        with self._lock:
            self.events.clear()
            self._t0 = time.perf_counter()


@contextlib.contextmanager
def trace(tracer: Tracer | None = None, *, record_content: bool = True) -> Iterator[Tracer]:
    """Trace every pipeline run inside the block."""
    t = tracer or Tracer(record_content=record_content)
    with attach_hooks(t):
        yield t
