"""Ordered, timestamped run events collected through the engine hooks, saved as JSON.

Events: ``input`` (a pipeline call starts), ``stage_start``, ``stage_end``, ``stage_error`` and
``output`` (a pipeline call ends), each with the full stage path (``stage``), ``t`` (seconds since
the tracer started, monotonic), ``timestamp`` (wall clock, ISO 8601, UTC) and ``thread``.

Spans: every pipeline call (``input`` … ``output``) and every stage call (``stage_start`` …
``stage_end``/``stage_error``) is a span. Its opening event carries ``span`` (an id unique within
the tracer) and ``parent`` (the span it ran inside, ``None`` for an outermost call); its closing
event repeats ``span``. Parents follow the work across threads and event loops, so ForEach items
(``stages[2].stage[3]``), loop iterations (the same path again) and concurrent calls of one
pipeline are told apart. ``stage_end``/``stage_error`` carry ``usage`` when the engine reports it;
a ``stage_error`` carries ``"cancelled": true`` when the stage was stopped from outside (a fail-fast
fan-out's other branches, a quorum, a timeout, Ctrl-C) or was left running and its LM call refused —
not a failure of the stage's own.

The saved document is ``{"version": 2, "events": [...], "graphs": {...}}``: the outermost
pipeline of each traced call is recorded once as a graph (:func:`stageflow.observe.graph_of`,
``to_dict()``), named by the ``graph`` key of that call's ``input`` event, so
``stageflow report trace.json`` can draw it.

Recorded content and error messages pass through :func:`stageflow.observe.redact.redact`, the
policy OpenTelemetry export uses too: values of credential-named fields (``api_key``,
``password``, ``Authorization``... at any depth), ``Bearer``/``Basic`` values, API-key-shaped text
and URL passwords are replaced by ``[REDACTED]`` before an event is kept, so neither a saved trace
nor the HTML report holds them.

Examples:
    >>> import stageflow
    >>> p = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x + 1}, writes=["y"])])
    >>> with stageflow.trace() as tracer:
    ...     _ = p(x=1)
    >>> [(e["event"], e["span"], e.get("parent")) for e in tracer.events]
    [('input', 1, None), ('stage_start', 2, 1), ('stage_end', 2, None), ('output', 1, None)]
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from stageflow.engine.hooks import Hook, attach_hooks
from stageflow.observe._json import dumps
from stageflow.observe.redact import redact, redact_text

__all__ = ["TRACE_VERSION", "Tracer", "jsonable", "trace"]

TRACE_VERSION = 2
logger = logging.getLogger("stageflow")


def jsonable(value: Any, limit: int = 2000) -> Any:
    """A JSON-safe copy of ``value`` (long strings cut to ``limit`` characters; ``nan`` and
    infinities as the strings ``"nan"``, ``"inf"``, ``"-inf"``, which strict JSON has no numbers for;
    an object whose ``repr`` raises as a placeholder naming its type).

    Examples:
        >>> class Broken:
        ...     def __repr__(self):
        ...         raise RuntimeError("no")
        >>> jsonable({"x": float("nan"), "y": Broken()})
        {'x': 'nan', 'y': '<Broken: repr raised RuntimeError>'}
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, str):
        return value if len(value) <= limit else value[:limit] + "…"
    store = getattr(value, "_store", None)
    if isinstance(store, dict):
        value = store
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [jsonable(v, limit) for v in value]
    try:
        if hasattr(value, "model_dump"):
            return jsonable(value.model_dump(), limit)
        return jsonable(repr(value), limit)
    except Exception as e:  # an object whose repr (or dump) raises: the trace keeps its events
        return f"<{type(value).__name__}: repr raised {type(e).__name__}>"


class _Frame:
    """The span a piece of work runs inside (one per open span, per context)."""

    __slots__ = ("span", "token")

    def __init__(self, span: int) -> None:
        self.span = span
        self.token: Token[_Frame | None] | None = None


# Graphs of outermost pipelines, shared by every tracer: built once per pipeline object and
# structure version (``add_stage`` bumps it). Keyed by id, with a weak reference to check identity.
_GRAPHS: dict[int, tuple[weakref.ref[Any], int, dict[str, Any]]] = {}
_GRAPHS_LOCK = threading.Lock()


def _graph_dict(pipeline: Any) -> dict[str, Any]:
    from stageflow.patterns._containers import structure_version

    version = structure_version()
    key = id(pipeline)
    with _GRAPHS_LOCK:
        hit = _GRAPHS.get(key)
    if hit is not None and hit[0]() is pipeline and hit[1] == version:
        return hit[2]
    from stageflow.observe.graph import graph_of

    graph = graph_of(pipeline).to_dict()
    try:
        ref: weakref.ref[Any] = weakref.ref(pipeline, functools.partial(_forget, key))
    except TypeError:  # an object without weak references: draw it every time
        return graph
    with _GRAPHS_LOCK:
        _GRAPHS[key] = (ref, version, graph)
    return graph


def _forget(key: int, ref: weakref.ref[Any]) -> None:
    with _GRAPHS_LOCK:
        hit = _GRAPHS.get(key)
        if hit is not None and hit[0] is ref:
            del _GRAPHS[key]


class Tracer(Hook):
    """Records run events in order; thread-safe.

    Args:
        record_content: Include stage inputs and outputs in the events (default ``True``), with
            secrets redacted (see the module docstring); turn it off when they hold data that must
            not be written to disk.
        record_graph: Record the graph of each outermost pipeline traced (default ``True``).
    """

    def __init__(self, *, record_content: bool = True, record_graph: bool = True) -> None:
        self.record_content = record_content
        self.record_graph = record_graph
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._ids = itertools.count(1)
        self._current: ContextVar[_Frame | None] = ContextVar("stageflow_tracer_span", default=None)
        self.events: list[dict[str, Any]] = []
        #: Graph name → ``Graph.to_dict()``; read-only (shared with other tracers of the same pipeline).
        self.graphs: dict[str, dict[str, Any]] = {}
        self._graph_names: dict[int, str] = {}

    def __deepcopy__(self, memo: dict[int, Any]) -> Tracer:
        return Tracer(record_content=self.record_content, record_graph=self.record_graph)

    # -- spans --------------------------------------------------------------------------------------
    def _open(self) -> tuple[int, int | None]:
        """A new span inside the current one: ``(span, parent)``."""
        parent = self._current.get()
        frame = _Frame(next(self._ids))
        frame.token = self._current.set(frame)
        return frame.span, None if parent is None else parent.span

    def _close(self) -> int | None:
        """Leave the current span (opened in this same context by :meth:`_open`); return its id."""
        frame = self._current.get()
        if frame is None:
            return None
        try:
            self._current.reset(frame.token)  # type: ignore[arg-type]
        except ValueError:  # opened in another context: cannot happen through the engine's hooks
            self._current.set(None)
        return frame.span

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
            if k in ("inputs", "outputs"):
                record[k] = redact(jsonable(v))
            else:
                record[k] = jsonable(v) if k == "usage" else v
        with self._lock:
            self.events.append(record)

    def _graph_name(self, pipeline: Any) -> str | None:
        try:
            graph = _graph_dict(pipeline)
        except Exception:  # a picture must never break a run; say why it is missing
            logger.warning("stageflow tracer: no graph for %s", type(pipeline).__name__, exc_info=True)
            return None
        with self._lock:
            name = self._graph_names.get(id(graph))
            if name is None:
                name = f"g{len(self.graphs) + 1}"
                self.graphs[name] = graph
                self._graph_names[id(graph)] = name
        return name

    # -- hooks --------------------------------------------------------------------------------------
    def on_run_start(self, *, path: str, pipeline: Any, inputs: dict[str, Any], **future: Any) -> None:
        span, parent = self._open()
        extra: dict[str, Any] = {}
        if not path:
            if self.record_graph:
                name = self._graph_name(pipeline)
                if name is not None:
                    extra["graph"] = name
            extra["fingerprint"] = _fingerprint(pipeline)
        self._emit(
            "input", path, span=span, parent=parent, pipeline=type(pipeline).__name__, inputs=inputs, **extra
        )

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
            extra["error"] = redact_text(f"{type(error).__name__}: {error}")
        self._emit("output", path, span=self._close(), outputs=outputs, **extra)

    def before_stage(self, *, path: str, stage: Any, inputs: dict[str, Any], **future: Any) -> None:
        span, parent = self._open()
        self._emit(
            "stage_start", path, span=span, parent=parent, stage_type=type(stage).__name__, inputs=inputs
        )

    def after_stage(self, *, path: str, outputs: Any, elapsed: float, **future: Any) -> None:
        usage = future.get("usage")
        extra = {} if usage is None else {"usage": usage}
        self._emit("stage_end", path, span=self._close(), elapsed=elapsed, outputs=outputs, **extra)

    def on_stage_error(self, *, path: str, error: BaseException, elapsed: float, **future: Any) -> None:
        usage = future.get("usage")
        extra: dict[str, Any] = {} if usage is None else {"usage": usage}
        if future.get("cancelled") is True:
            extra["cancelled"] = True  # (stopped from outside, or its LM call refused: not its failure)
        self._emit(
            "stage_error",
            path,
            span=self._close(),
            elapsed=elapsed,
            error=redact_text(f"{type(error).__name__}: {error}"),
            **extra,
        )

    # -- output -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The trace document ``{"version", "events", "graphs"}`` (see the module docstring)."""
        with self._lock:
            events, graphs = list(self.events), dict(self.graphs)
        # Graphs are shared by every tracer of the same pipeline: hand out copies.
        return {"version": TRACE_VERSION, "events": events, "graphs": copy.deepcopy(graphs)}

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text (UTF-8-safe: any string, even a lone surrogate, round-trips)."""
        return dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`to_json` to ``path`` (missing parent folders are created) with
        :func:`stageflow.outfile.write_text`: a regular file is replaced atomically, keeping its mode."""
        from stageflow.outfile import write_text

        target = Path(path)
        if os.fspath(path) != "-":  # standard output
            target.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, self.to_json(), "the trace")
        return target

    def save_report(self, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
        """Write the self-contained HTML run report of the events so far to ``path``
        (see :func:`stageflow.observe.report.write_report`)."""
        from stageflow.observe.report import write_report

        return write_report(self, path, title=title)

    def reset(self) -> None:
        """Drop recorded events and graphs and restart the clock."""
        with self._lock:
            self.events.clear()
            self.graphs.clear()
            self._graph_names.clear()
            self._t0 = time.perf_counter()


@contextlib.contextmanager
def trace(
    tracer: Tracer | None = None, *, record_content: bool = True, record_graph: bool = True
) -> Iterator[Tracer]:
    """Trace every pipeline run inside the block (see :class:`Tracer` for the options)."""
    t = tracer or Tracer(record_content=record_content, record_graph=record_graph)
    with attach_hooks(t):
        yield t


def _fingerprint(pipeline: Any) -> str | None:
    """The program's :func:`stageflow.fingerprint` as it runs (``None`` if it cannot be computed):
    two traces with the same fingerprint come from the same program."""
    from stageflow.fingerprinting import fingerprint

    try:
        return fingerprint(pipeline)
    except Exception:  # a stage whose attributes raise when read: the trace goes on without it
        return None
