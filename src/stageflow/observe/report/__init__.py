"""The HTML run report: one self-contained file from a trace.

``write_report(trace, "report.html")`` takes a :class:`~stageflow.Tracer`, a trace document (the
dict ``tracer.to_dict()`` returns) or the path of a JSON file ``tracer.save()`` wrote. The page
shows the pipeline graph, a per-stage table (time, calls, and, when the trace has them, LM calls,
tokens, cost, cache hits, retries and repairs), a timeline of every span on one time axis, and each
span's inputs and outputs on a click. It makes no network request and runs no trace text.
``stageflow report TRACE -o report.html`` does the same from the command line.

Examples:
    >>> import stageflow, tempfile, os
    >>> p = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x + 1}, writes=["y"])])
    >>> with stageflow.trace() as tracer:
    ...     _ = p(x=1)
    >>> html = render_report(tracer)
    >>> html.startswith("<!DOCTYPE html>") and "stages[0]" in html
    True
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stageflow.errors import ConfigurationError
from stageflow.observe.graph.model import Graph
from stageflow.observe.report.page import render_page
from stageflow.observe.report.spans import build_spans

__all__ = ["load_trace", "render_report", "write_report"]

_EVENT_NAMES = ("input", "output", "stage_start", "stage_end", "stage_error")


def load_trace(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a trace file written by :meth:`Tracer.save`."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"Cannot read the trace file {p}: {exc.strerror or exc}.",
            code="bad_trace",
            hint="write one with tracer.save('trace.json') inside `with stageflow.trace() as tracer:`",
        ) from exc
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigurationError(f"{p} is not UTF-8 text (byte {exc.start}).", code="bad_trace") from exc
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"{p} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).", code="bad_trace"
        ) from exc
    return check_trace(doc, str(p))


def check_trace(doc: Any, where: str = "the trace") -> dict[str, Any]:
    """``doc`` if it is a trace document; otherwise a :class:`ConfigurationError` saying what is wrong."""
    hint = "pass the JSON that stageflow.Tracer.save() writes: {'events': [...], 'graphs': {...}}"
    if isinstance(doc, list):
        doc = {"events": doc}  # a bare list of events (e.g. result.execution_trace)
    if not isinstance(doc, Mapping) or not isinstance(doc.get("events"), list):
        raise ConfigurationError(f"{where} has no 'events' list.", code="bad_trace", hint=hint)
    for i, e in enumerate(doc["events"]):
        if not isinstance(e, Mapping) or not isinstance(e.get("stage", ""), str):
            raise ConfigurationError(
                f"{where}: event {i} is not an event object with a string 'stage' (got {str(e)[:80]!r}).",
                code="bad_trace",
                hint=hint,
            )
        if e.get("event") in _EVENT_NAMES and not isinstance(e.get("t", 0), int | float):
            raise ConfigurationError(
                f"{where}: event {i} ({e.get('event')}) has a non-numeric time t={e.get('t')!r}.",
                code="bad_trace",
                hint=hint,
            )
    graphs = doc.get("graphs", {})
    if not isinstance(graphs, Mapping):
        raise ConfigurationError(f"{where}: 'graphs' is not an object.", code="bad_trace", hint=hint)
    return dict(doc)


def render_report(trace: Any, *, title: str | None = None, source: str = "") -> str:
    """The report page as HTML text (see the module docstring for ``trace``)."""
    if hasattr(trace, "to_dict") and hasattr(trace, "events"):
        doc = check_trace(trace.to_dict())
    elif isinstance(trace, str | os.PathLike):
        source = source or str(trace)
        doc = load_trace(trace)
    else:
        doc = check_trace(trace)
    roots, warnings = build_spans(doc["events"])
    graphs: dict[str, Graph] = {}
    for name, g in doc.get("graphs", {}).items():
        try:
            graphs[str(name)] = Graph.from_dict(g)
        except ConfigurationError as exc:
            warnings.append(f"graph {name!r} could not be drawn: {exc.message}")
    if title is None:
        names = sorted({g.title for g in graphs.values()}) or sorted({s.type for s in roots if s.type})
        title = f"stageflow run: {', '.join(names)}" if names else "stageflow run"
    return render_page(roots, graphs, warnings, title=title, source=source or "trace")


def write_report(trace: Any, path: str | os.PathLike[str], *, title: str | None = None) -> Path:
    """Write the report of ``trace`` to ``path`` (atomically); return the path."""
    source = str(trace) if isinstance(trace, str | os.PathLike) else ""
    html = render_report(trace, title=title, source=source)
    target = Path(path)
    if target.is_dir():
        raise ConfigurationError(
            f"Cannot write the report to {target}: it is a directory.",
            code="bad_output",
            hint=f"name a file, e.g. {target / 'report.html'}",
        )
    if not target.parent.is_dir():
        raise ConfigurationError(
            f"Cannot write the report to {target}: the directory {target.parent} does not exist.",
            code="bad_output",
        )
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(html)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target
