"""The report page: one HTML file with its CSS, script, data and graph pictures inline.

The page loads nothing: a Content-Security-Policy allows no source at all (``default-src 'none'``)
and admits exactly this page's script and style by their SHA-256 hashes, so even text that slipped
past escaping could neither run nor fetch. The trace data sits in ``<script
type="application/json">`` elements with ``<``, ``>`` and ``&`` written as ``\\u003c`` etc., so it
cannot close the element (large inputs and outputs are gzip-compressed and base64-encoded, which has
no such characters at all); the script inserts it into the page as text only.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import math
from datetime import UTC, datetime
from functools import cache
from importlib import resources
from typing import Any
from xml.sax.saxutils import escape

from stageflow._version import __version__
from stageflow.observe._json import dumps
from stageflow.observe.graph.model import Graph, clean_text
from stageflow.observe.report.spans import Span, pipeline_prefixes, row_keys, stage_table, walk
from stageflow.observe.report.svg import graph_svg

__all__ = ["COLLAPSE_CHILDREN", "COLLAPSE_OVER", "CONTENT_INLINE_LIMIT", "render_page"]

#: Above this many spans, spans with more than COLLAPSE_CHILDREN direct children start collapsed.
COLLAPSE_OVER = 2000
COLLAPSE_CHILDREN = 50
#: Inputs and outputs larger than this (characters of JSON) are embedded gzip-compressed (base64)
#: and unpacked by the browser's own ``DecompressionStream`` when the page opens: traces repeat the
#: state from span to span, so they shrink many times over.
CONTENT_INLINE_LIMIT = 512 * 1024

_SCRIPT_SAFE = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


@cache
def _asset(name: str) -> str:
    return resources.files("stageflow.observe.report").joinpath(name).read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def _finite(value: Any) -> Any:
    """Strict JSON: non-finite floats (from traces written before stageflow wrote them as text)
    become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _labels(graphs: dict[str, Graph], prefixes: dict[str, str]) -> dict[str, str]:
    """Row key → what the graph calls the stage (``retrieve()``, ``Predict``)."""
    out: dict[str, str] = {}
    for name, g in graphs.items():
        prefix = prefixes.get(name, "")
        for n in g.nodes.values():
            if n.path:
                out.setdefault(prefix + str(n.path), clean_text(n.label, limit=60))
    return out


def _payload(roots: list[Span], warnings: list[str], labels: dict[str, str]) -> dict[str, Any]:
    flat = walk(roots)
    index = {s.id: i for i, s in enumerate(flat)}
    last = list(range(len(flat)))
    for i in range(len(flat) - 1, -1, -1):  # the last index of each subtree (depth-first order)
        s = flat[i]
        if s.children:
            last[i] = last[index[s.children[-1].id]]
    keys = row_keys(roots)
    spans = [
        [
            s.id,
            index.get(s.parent, -1) if s.parent is not None else -1,
            s.depth,
            s.path,
            s.kind,
            labels.get(keys[i], s.type),
            s.start,
            s.end if s.end is not None else s.start,
            s.status,
            s.thread,
            len(s.children),
            last[i],
        ]
        for i, s in enumerate(flat)
    ]
    rows, totals = stage_table(flat, keys)
    for n, r in enumerate(rows):
        r["first_index"] = n
        r["type"] = labels.get(r["key"], r["type"])
    return {
        "t0": min((s.start for s in flat), default=0.0),
        "t1": max((s.end or s.start for s in flat), default=0.0),
        "spans": spans,
        "keys": keys,
        "stages": rows,
        "totals": totals,
        "warnings": warnings,
        "collapse_over": COLLAPSE_OVER,
        "collapse_children": COLLAPSE_CHILDREN,
    }


def _content_element(flat: list[Span], limit: int) -> str:
    """The spans' inputs, outputs, errors and usage, in span order: JSON, or gzip+base64 when large."""
    contents = [s.content() or None for s in flat]
    try:
        text = dumps(contents, allow_nan=False)
    except ValueError:  # a trace written before stageflow recorded nan/inf as text
        text = dumps(_finite(contents))
    if len(text) <= limit:
        return f'<script type="application/json" id="sf-content">{text.translate(_SCRIPT_SAFE)}</script>'
    packed = base64.b64encode(gzip.compress(text.encode("utf-8"), compresslevel=6)).decode("ascii")
    attrs = 'type="application/octet-stream" id="sf-content" data-encoding="gzip-base64"'
    return f"<script {attrs}>{packed}</script>"


def _graph_sections(graphs: dict[str, Graph], runs: dict[str, int], prefixes: dict[str, str]) -> str:
    if not graphs:
        return '<p class="muted">This trace has no pipeline graph (traced before stageflow recorded one).</p>'
    parts = []
    for name, g in graphs.items():
        count = runs.get(name, 0)
        prefix = prefixes.get(name, "")
        caption = f"{prefix}{g.title} · {count} call{'s' if count != 1 else ''}"
        svg = graph_svg(g, key_prefix=prefix)
        parts.append(f'<h3>{escape(clean_text(caption))}</h3><div class="graph-wrap">{svg}</div>')
    return "\n".join(parts)


def render_page(
    roots: list[Span], graphs: dict[str, Graph], warnings: list[str], *, title: str, source: str
) -> str:
    """The whole HTML document."""
    prefixes = pipeline_prefixes(roots)
    data = _payload(roots, warnings, _labels(graphs, prefixes))
    content = _content_element(walk(roots), CONTENT_INLINE_LIMIT)
    runs: dict[str, int] = {}
    for s in roots:
        if s.graph is not None:
            runs[s.graph] = runs.get(s.graph, 0) + 1
    flat_count = len(data["spans"])
    stage_spans = sum(1 for row in data["spans"] if row[4] == "stage")
    errors = sum(1 for row in data["spans"] if row[8] == "error")
    wall = data["t1"] - data["t0"]
    script, style = _asset("report.js"), _asset("report.css")
    csp = (
        f"default-src 'none'; script-src '{_sha256(script)}'; style-src '{_sha256(style)}'; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )
    json_text = dumps(data).translate(_SCRIPT_SAFE)
    warn_html = "".join(f'<p class="warn">{escape(clean_text(w))}</p>' for w in warnings)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    t = escape(clean_text(title))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="stageflow {escape(__version__)}">
<title>{t}</title>
<style>{style}</style>
</head>
<body>
<h1>{t}</h1>
<p class="muted">{escape(clean_text(source))} · written {stamp} by stageflow {escape(__version__)}</p>
<div class="summary">
<span><b>{len(roots)}</b> pipeline call{"s" if len(roots) != 1 else ""}</span>
<span><b>{stage_spans}</b> stage spans</span>
<span><b>{errors}</b> errors</span>
<span><b>{wall * 1000:.1f} ms</b> from first start to last end</span>
<span class="muted">{flat_count} spans in all</span>
</div>
{warn_html}
<h2>Pipeline</h2>
{_graph_sections(graphs, runs, prefixes)}
<h2>Stages</h2>
<p class="muted">One row per stage path (ForEach items together as <code>stage[*]</code>).
A pipeline's time includes its stages; the last row adds up the stages that contain no others.
Click a row to find its spans.</p>
<div class="table-wrap"><table class="stages"><thead><tr id="stage-head"></tr></thead>
<tbody id="stage-rows"></tbody></table></div>
<h2>Timeline</h2>
<p><button id="expand-all" type="button">Expand all</button>
<button id="collapse-all" type="button">Collapse</button>
<span class="muted">Bars on one time axis: overlapping bars ran at the same time.
Click a span for its inputs and outputs.</span></p>
<div class="tl">
<div class="tl-main">
<div class="axis"><div class="muted">&nbsp;span</div><div class="ticks" id="tl-ticks"></div></div>
<div id="tl-rows"></div></div>
<aside class="details" id="details"><p class="muted">Click a span.</p></aside>
</div>
<script type="application/json" id="sf-data">{json_text}</script>
{content}
<script>{script}</script>
</body>
</html>
"""
