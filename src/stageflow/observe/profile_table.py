"""The plain-text table of :meth:`stageflow.observe.profiler.Profiler.table`.

Examples:
    >>> split_path("stages[1].branches['a.b'].stage[3]")
    ['stages[1]', "branches['a.b']", 'stage[3]']
    >>> group_key("stages[1].stage[3].stages[0]")
    'stages[1].stage[*].stages[0]'
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stageflow.observe.profiler import RunProfile

__all__ = ["group_key", "render_table", "split_path"]

_ITEM = re.compile(r"stage\[\d+\]")
_SUMMED = (
    "num_executions",
    "errors",
    "cancelled",
    "total_time",
    "lm_calls",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "lm_cache_hits",
    "cache_hits",
    "retries",
    "repairs",
    "limit_wait",
    "fast_fallbacks",
)
_STAGE_WIDTH = 48
_PATH_SHOWN = 10  # critical-path steps printed before "… n more …"


def split_path(path: str) -> list[str]:
    """A stage path's segments: split on dots outside brackets and quotes."""
    parts: list[str] = []
    depth = 0
    quote = ""
    start = 0
    for i, ch in enumerate(path):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"" and depth:
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "." and depth == 0:
            parts.append(path[start:i])
            start = i + 1
    parts.append(path[start:])
    return parts


def group_key(path: str) -> str:
    """``path`` with ForEach item positions (``stage[3]``) replaced by ``stage[*]``."""
    return ".".join("stage[*]" if _ITEM.fullmatch(p) else p for p in split_path(path))


def _merge(rows: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path, row in rows.items():
        key = group_key(path)
        mine = out.get(key)
        if mine is None:
            out[key] = dict(row)
            continue
        for k in _SUMMED:
            mine[k] = mine.get(k, 0) + row.get(k, 0)
        if row.get("cost") is not None:
            mine["cost"] = (mine.get("cost") or 0.0) + row["cost"]
        mine["min_time"] = min(mine["min_time"], row["min_time"])
        mine["max_time"] = max(mine["max_time"], row["max_time"])
    for row in out.values():
        n = row["num_executions"]
        row["avg_time"] = row["total_time"] / n if n else 0.0
    return out


def _cost(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


_HEADER = (
    ("calls", 6),
    ("total s", 9),
    ("avg ms", 9),
    ("LM calls", 9),
    ("tokens in", 10),
    ("tokens out", 11),
    ("cost", 9),
    ("cache", 6),
    ("LM cache", 9),
    ("retries", 8),
    ("repairs", 8),
    ("errors", 7),
)


#: Columns shown only when some row has a value: ``(header, width, usage field, format)``. A wait for a
#: rate limit or a budget (``limit_wait``); LM calls whose prompt the fast adapter path left to DSPy's
#: own adapter (``fast_fallbacks``).
_OPTIONAL: tuple[tuple[str, int, str, Any], ...] = (
    ("wait s", 8, "limit_wait", lambda v: f"{v or 0.0:.3f}"),
    ("DSPy adapter", 13, "fast_fallbacks", lambda v: str(v or 0)),
    ("cancelled", 10, "cancelled", lambda v: "" if v == "" else str(v or 0)),
)
_LEGEND = {
    "fast_fallbacks": "DSPy adapter: LM calls whose prompt the fast path left to DSPy's own adapter "
    "(the reasons: stageflow.lm.fast.fast_path_stats())",
    "cancelled": "cancelled: calls stopped from outside (a fail-fast fan-out's other branches, a quorum, "
    "a timeout, Ctrl-C) or left running and refused their LM calls; not errors",
}


def _cells(
    row: Mapping[str, Any],
    calls: Any,
    total: float,
    avg: str,
    extra: Sequence[tuple[str, int, str, Any]] = (),
) -> list[str]:
    cells = [
        str(calls),
        f"{total:.3f}",
        avg,
        str(row.get("lm_calls", 0)),
        str(row.get("input_tokens", 0)),
        str(row.get("output_tokens", 0)),
        _cost(row.get("cost")),
        str(row.get("cache_hits", 0)),
        str(row.get("lm_cache_hits", 0)),
        str(row.get("retries", 0)),
        str(row.get("repairs", 0)),
    ]
    cells += [fmt(row.get(key)) for _, _, key, fmt in extra]
    cells.append(str(row.get("errors", "")))
    return cells


def _line(label: str, cells: Sequence[str], width: int, extra: Sequence[tuple[str, int, str, Any]]) -> str:
    if len(label) > width:
        label = label[: width - 1] + "…"
    header = (*_HEADER[:-1], *((h, w) for h, w, _, _ in extra), _HEADER[-1])
    return f"{label:<{width}}" + "".join(f"{c:>{w}}" for c, (_, w) in zip(cells, header, strict=True))


def _critical(run: RunProfile) -> list[str]:
    steps = [f"{s.path} ({_ms(s.elapsed)})" for s in run.critical_path]
    if len(steps) > 2 * _PATH_SHOWN:
        steps = [*steps[:_PATH_SHOWN], f"… {len(steps) - 2 * _PATH_SHOWN} more …", *steps[-_PATH_SHOWN:]]
    ratio = f" (wall / perfect = {run.wall / run.ideal_time:.2f}×)" if run.ideal_time > 0 else ""
    lines = [
        f"last run: wall {_ms(run.wall)}; critical path {_ms(run.critical_time)} "
        f"({len(run.critical_path)} of {run.stage_calls} stage calls); "
        f"perfect parallel schedule {_ms(run.ideal_time)}{ratio}",
        "critical path: " + (" → ".join(steps) if steps else "(no stages)"),
    ]
    if run.error:
        lines.append(f"the run failed: {run.error}")
    return lines


def render_table(
    summary: Mapping[str, Mapping[str, Any]],
    totals: Mapping[str, Any],
    last_run: RunProfile | None,
    group_items: bool = True,
) -> str:
    """The profiler's table (see :meth:`stageflow.observe.profiler.Profiler.table`)."""
    rows = _merge(summary) if group_items else {k: dict(v) for k, v in summary.items()}
    labels = {path: "  " * (len(split_path(path)) - 1) + path for path in rows}
    width = min(_STAGE_WIDTH, max([len("stage"), len("all runs (000)"), *map(len, labels.values())]) + 2)
    extra = [c for c in _OPTIONAL if any(row.get(c[2]) for row in rows.values())]
    names = [h for h, _ in _HEADER]
    lines = [_line("stage", [*names[:-1], *(h for h, _, _, _ in extra), names[-1]], width, extra)]
    for path, row in rows.items():
        cells = _cells(row, row["num_executions"], row["total_time"], f"{row['avg_time'] * 1000:.2f}", extra)
        lines.append(_line(labels[path], cells, width, extra))
    runs = totals.get("runs", 0)
    avg = f"{totals.get('wall', 0.0) / runs * 1000:.2f}" if runs else "-"
    cells = _cells({**totals, "errors": "", "cancelled": ""}, runs, totals.get("wall", 0.0), avg, extra)
    lines.append(_line(f"all runs ({runs})", cells, width, extra))
    lines += [_LEGEND[key] for _, _, key, _ in extra if key in _LEGEND]
    if last_run is not None:
        lines += ["", *_critical(last_run)]
    return "\n".join(lines)
