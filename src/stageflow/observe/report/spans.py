"""From a trace document's events to spans (a tree, in time order) and a per-stage table.

Traces written by this stageflow carry span ids (see :mod:`stageflow.observe.tracer`). Older
traces (no ``span`` keys) are paired by stage path and thread, and parents are found by path: the
innermost open span whose path encloses the new one.

A nested pipeline's own call (its ``input``/``output`` events) has the path of the stage that
holds it; it is folded into that stage's span, so the tree shows each stage once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Span",
    "StageRow",
    "build_spans",
    "pipeline_prefixes",
    "row_keys",
    "stage_key",
    "stage_table",
    "walk",
]

_MISSING: Any = object()
_ITEM = re.compile(r"(^|\.)stage\[\d+\]")
USAGE_KEYS = ("lm_calls", "input_tokens", "output_tokens", "cache_hits", "retries", "repairs")


def stage_key(path: str) -> str:
    """The table row (and graph node) of a span: ForEach items share one (``stage[3]`` → ``stage[*]``).

    Examples:
        >>> stage_key("stages[2].stage[13].stages[0]")
        'stages[2].stage[*].stages[0]'
    """
    return _ITEM.sub(r"\1stage[*]", path)


@dataclass(eq=False)
class Span:
    """One pipeline call (``kind="run"``) or stage call (``kind="stage"``)."""

    id: int
    parent: int | None
    path: str
    kind: str
    type: str
    start: float
    end: float | None = None
    status: str = "running"
    error: str | None = None
    inputs: Any = _MISSING
    outputs: Any = _MISSING
    usage: Mapping[str, Any] | None = None
    thread: int | None = None
    graph: str | None = None
    children: list[Span] = field(default_factory=list)
    depth: int = 0

    @property
    def duration(self) -> float:
        return 0.0 if self.end is None else max(0.0, self.end - self.start)

    def content(self) -> dict[str, Any]:
        """What the report shows on demand: inputs, outputs, error, usage (those recorded)."""
        out: dict[str, Any] = {}
        if self.inputs is not _MISSING:
            out["inputs"] = self.inputs
        if self.outputs is not _MISSING:
            out["outputs"] = self.outputs
        if self.error is not None:
            out["error"] = self.error
        if self.usage is not None:
            out["usage"] = dict(self.usage)
        return out


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class _Builder:
    def __init__(self) -> None:
        self.spans: dict[int, Span] = {}
        self.open: dict[int, Span] = {}  # spans not closed yet, in opening order
        self.next_id = -1  # synthetic ids are negative: they never clash with recorded ones
        self.unmatched = 0

    def opening(self, e: Mapping[str, Any], kind: str) -> None:
        path = str(e.get("stage", ""))
        sid = e.get("span")
        if isinstance(sid, int) and not isinstance(sid, bool):
            parent = e.get("parent")
            parent = parent if isinstance(parent, int) and parent in self.spans else None
        else:
            sid, self.next_id = self.next_id, self.next_id - 1
            parent = self._parent_by_path(path, kind, e.get("thread"))
        span = Span(
            id=sid,
            parent=parent,
            path=path,
            kind=kind,
            type=str(e.get("stage_type") or e.get("pipeline") or ""),
            start=_num(e.get("t")) or 0.0,
            thread=e.get("thread") if isinstance(e.get("thread"), int) else None,
            graph=e.get("graph") if isinstance(e.get("graph"), str) else None,
        )
        if "inputs" in e:
            span.inputs = e["inputs"]
        self.spans[sid] = span
        self.open[sid] = span

    def _parent_by_path(self, path: str, kind: str, thread: Any) -> int | None:
        """The innermost open span enclosing ``path``: a pipeline call belongs to the stage of the
        same path; a stage to the longest enclosing path (a nested call before its stage), then
        to one on the same thread, then to the latest."""
        best: tuple[int, bool, bool, int] | None = None
        found: Span | None = None
        for order, s in enumerate(self.open.values()):
            if kind == "run":
                fits = s.kind == "stage" and s.path == path and path != ""
            else:
                fits = s.path == "" or path.startswith(s.path + ".")
            if not fits:
                continue
            rank = (len(s.path), s.kind == "run", s.thread == thread, order)
            if best is None or rank > best:
                best, found = rank, s
        return None if found is None else found.id

    def closing(self, e: Mapping[str, Any], kind: str) -> None:
        sid = e.get("span")
        span = self.spans.get(sid) if isinstance(sid, int) else None
        if span is None:
            span = self._match(str(e.get("stage", "")), kind, e.get("thread"))
        if span is None:
            self.unmatched += 1
            return
        with_end = _num(e.get("t"))
        span.end = with_end if with_end is not None else span.start + (_num(e.get("elapsed")) or 0.0)
        error = e.get("error")
        # (a stage stopped from outside, or whose LM call was refused, is cancelled: not its failure)
        span.status = ("cancelled" if e.get("cancelled") is True else "error") if error else "ok"
        span.error = None if error is None else str(error)
        if "outputs" in e and e["outputs"] is not None:
            span.outputs = e["outputs"]
        usage = e.get("usage")
        if isinstance(usage, Mapping):
            span.usage = usage
        self.open.pop(span.id, None)

    def _match(self, path: str, kind: str, thread: Any) -> Span | None:
        fallback = None
        for s in reversed(self.open.values()):
            if s.path == path and s.kind == kind:
                if s.thread == thread:
                    return s
                fallback = fallback or s
        return fallback


_OPEN = {"input": "run", "stage_start": "stage"}
_CLOSE = {"output": "run", "stage_end": "stage", "stage_error": "stage"}


def build_spans(events: Iterable[Mapping[str, Any]]) -> tuple[list[Span], list[str]]:
    """The root spans (children attached, in start order) and warnings about the events."""
    b = _Builder()
    unknown = 0
    for e in events:
        name = e.get("event")
        if name in _OPEN:
            b.opening(e, _OPEN[name])
        elif name in _CLOSE:
            b.closing(e, _CLOSE[name])
        else:
            unknown += 1
    spans = b.spans
    # A nested pipeline's call folds into the stage span that holds it.
    folded: dict[int, int] = {}
    for s in spans.values():
        p = spans.get(s.parent) if s.parent is not None else None
        if s.kind == "run" and p is not None and p.kind == "stage" and p.path == s.path:
            folded[s.id] = p.id
    roots: list[Span] = []
    for s in spans.values():
        if s.id in folded:
            continue
        parent = s.parent
        while parent is not None and parent in folded:
            parent = folded[parent]
        s.parent = parent
        if parent is None:
            roots.append(s)
        else:
            spans[parent].children.append(s)
    last = max((x.end or x.start for x in spans.values()), default=0.0)
    warnings = []
    unfinished = [s for s in spans.values() if s.end is None and s.id not in folded]
    for s in unfinished:
        s.end = last
    if unfinished:
        warnings.append(f"{len(unfinished)} span(s) never finished (the trace stops while they run)")
    if b.unmatched:
        warnings.append(f"{b.unmatched} closing event(s) matched no open span")
    if unknown:
        warnings.append(f"{unknown} event(s) of unknown kinds were ignored")
    _order(roots, 0)
    return roots, warnings


def _order(spans: list[Span], depth: int) -> None:
    stack = [(spans, depth)]
    while stack:
        group, d = stack.pop()
        group.sort(key=lambda s: (s.start, abs(s.id)))
        for s in group:
            s.depth = d
            if s.children:
                stack.append((s.children, d + 1))


def walk(roots: list[Span]) -> list[Span]:
    """Every span, depth first, in start order."""
    out: list[Span] = []
    stack = list(reversed(roots))
    while stack:
        s = stack.pop()
        out.append(s)
        stack.extend(reversed(s.children))
    return out


def _group(root: Span) -> str:
    return root.graph if root.graph is not None else f"({root.type})"


def pipeline_prefixes(roots: list[Span]) -> dict[str, str]:
    """Pipeline (graph name, or ``(Type)`` without a graph) → the prefix of its table rows: none
    when the trace holds calls of one pipeline, ``#1 ``, ``#2 `` ... when of several, so the
    ``stages[0]`` of one pipeline is not counted with the ``stages[0]`` of another."""
    groups = list(dict.fromkeys(_group(r) for r in roots))
    if len(groups) <= 1:
        return dict.fromkeys(groups, "")
    return {g: f"#{i} " for i, g in enumerate(groups, 1)}


def row_keys(roots: list[Span]) -> list[str]:
    """The table row of every span of :func:`walk` ``(roots)``, in that order."""
    prefixes = pipeline_prefixes(roots)
    keys: list[str] = []
    for root in roots:
        prefix = prefixes[_group(root)]
        for s in walk([root]):
            keys.append(prefix + ("(pipeline call)" if s.kind == "run" else stage_key(s.path)))
    return keys


@dataclass
class StageRow:
    """One row of the per-stage table (every call of one stage path, ForEach items together)."""

    key: str
    type: str
    run: bool = False
    calls: int = 0
    errors: int = 0
    total: float = 0.0
    longest: float = 0.0
    first: float = math.inf
    leaf: bool = True
    with_usage: int = 0
    usage: dict[str, float] = field(default_factory=dict)
    cost: float | None = None
    cost_unknown: int = 0

    def add(self, s: Span) -> None:
        self.calls += 1
        self.errors += s.status == "error"
        self.total += s.duration
        self.longest = max(self.longest, s.duration)
        self.first = min(self.first, s.start)
        self.leaf = self.leaf and not s.children
        if s.usage is None:
            return
        self.with_usage += 1
        for k in USAGE_KEYS:
            v = _num(s.usage.get(k))
            if v is not None:
                self.usage[k] = self.usage.get(k, 0.0) + v
        cost = _num(s.usage.get("cost"))
        if cost is None:
            self.cost_unknown += 1
        else:
            self.cost = (self.cost or 0.0) + cost

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "type": self.type,
            "calls": self.calls,
            "errors": self.errors,
            "total": self.total,
            "mean": self.total / self.calls if self.calls else 0.0,
            "max": self.longest,
            "leaf": self.leaf,
            "usage": self.usage if self.with_usage else None,
            "cost": self.cost,
            "cost_partial": self.cost is not None and self.cost_unknown > 0,
        }


def stage_table(
    spans: Iterable[Span], keys: Iterable[str] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows per key (default: :func:`stage_key`) in first-start order, and totals over leaf stages
    (so nested pipelines are not counted twice)."""
    rows: dict[str, StageRow] = {}
    spans = list(spans)
    if keys is None:
        keys = ["(pipeline call)" if s.kind == "run" else stage_key(s.path) for s in spans]
    for s, key in zip(spans, keys, strict=True):
        row = rows.get(key)
        if row is None:
            row = rows[key] = StageRow(key, s.type, run=s.kind == "run")
        row.add(s)
    ordered = sorted(rows.values(), key=lambda r: r.first)
    totals = StageRow("total", "")
    for r in ordered:
        if r.run or not r.leaf:
            continue
        totals.calls += r.calls
        totals.errors += r.errors
        totals.total += r.total
        totals.with_usage += r.with_usage
        totals.cost_unknown += r.cost_unknown
        for k, v in r.usage.items():
            totals.usage[k] = totals.usage.get(k, 0.0) + v
        if r.cost is not None:
            totals.cost = (totals.cost or 0.0) + r.cost
    return [r.to_dict() for r in ordered], totals.to_dict()
