"""Inline SVG of a :class:`~stageflow.observe.graph.Graph`, laid out without any library.

The cluster tree already says how to arrange things: a ``column`` cluster stacks its children top
to bottom in run order (:func:`run_order` puts them so that every arrow but a loop's points down),
a ``row`` cluster puts alternatives or concurrent work side by side. So the layout is a recursive
box packing; arrows go from the bottom of one box to the top of the next, and a loop's arrow
returns along the right side. All text is XML-escaped.

Examples:
    >>> from stageflow.observe.graph import Graph
    >>> g = Graph()
    >>> c = g.add_cluster("P", kind="sequential", path="")
    >>> a = g.add_node("<b>", kind="function", path="stages[0]", cluster=c)
    >>> svg = graph_svg(g)
    >>> "&lt;b&gt;" in svg and "<b>" not in svg
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

from stageflow.observe.graph.model import Graph, clean_text
from stageflow.observe.graph.render import STYLE

__all__ = ["graph_svg", "run_order"]

CHAR_W = 6.4  # average width of a 11px sans-serif character
LINE_H = 14
PAD_X, PAD_Y = 10, 6
MAX_CHARS = 44
GAP_COL, GAP_ROW = 30, 18
CLUSTER_PAD = 10


@dataclass
class _Box:
    w: float
    h: float
    x: float = 0.0
    y: float = 0.0


def _lines(label: str, detail: str, width: int = MAX_CHARS) -> list[str]:
    out = [clean_text(label)] if label else []
    if detail:
        out += clean_text(detail).split("\n")
    cut = []
    for line in out[:8]:
        cut.append(line if len(line) <= width else line[: width - 1] + "…")
    if len(out) > 8:
        cut.append("…")
    return cut


def _up(g: Graph, ident: str) -> list[str]:
    """``ident`` and the clusters holding it, innermost first."""
    chain = [ident]
    parent = g.nodes[ident].cluster if ident in g.nodes else g.clusters[ident].parent
    while parent is not None and parent in g.clusters and parent not in chain:
        chain.append(parent)
        parent = g.clusters[parent].parent
    return chain


def run_order(g: Graph) -> dict[str, list[str]]:
    """Each ``column`` cluster's children, ordered so that every arrow but a loop's points down.

    A cluster lists its children in run order, but a graph saved by an older stageflow may list a
    join point after the blocks it joins. A child goes after every sibling an arrow comes from;
    otherwise the listed order is kept (a stable topological sort; arrows going round a cycle are
    ignored).

    Examples:
        >>> g = Graph()
        >>> c = g.add_cluster("P", kind="sequential", path="")
        >>> a = g.add_node("a", kind="function", cluster=c)
        >>> b = g.add_node("b", kind="function", cluster=c)
        >>> g.add_edge(b, a)
        >>> [g.nodes[k].label for k in run_order(g)[c]]
        ['b', 'a']
    """
    after: dict[str, dict[str, set[str]]] = {}  # cluster -> child -> siblings it must follow
    for e in g.edges:
        if e.kind == "loop" or e.source not in g.nodes or e.target not in g.nodes:
            continue
        src, dst = _up(g, e.source), _up(g, e.target)
        common = next((c for c in src if c in dst and c in g.clusters), None)
        if common is None or g.clusters[common].layout != "column":
            continue
        first, then = src[src.index(common) - 1], dst[dst.index(common) - 1]
        if first != then:
            after.setdefault(common, {}).setdefault(then, set()).add(first)
    order: dict[str, list[str]] = {}
    for cid, c in g.clusters.items():
        rules = _acyclic(after.get(cid, {}))
        left, placed = list(c.children), []
        while left:
            waiting = set(left)
            free = next((k for k in left if not (rules.get(k, set()) & waiting)), left[0])
            left.remove(free)
            placed.append(free)
        order[cid] = placed
    return order


def _acyclic(rules: dict[str, set[str]]) -> dict[str, set[str]]:
    """``rules`` (child -> siblings it must follow) without those between children on one cycle:
    arrows going round say nothing about which is drawn first."""

    def before(k: str) -> set[str]:
        seen: set[str] = set()
        todo = list(rules.get(k, ()))
        while todo:
            x = todo.pop()
            if x not in seen:
                seen.add(x)
                todo += rules.get(x, ())
        return seen

    reach = {k: before(k) for k in rules}
    return {k: {x for x in firsts if k not in reach.get(x, set())} for k, firsts in rules.items()}


class _Layout:
    def __init__(self, g: Graph) -> None:
        self.g = g
        self.boxes: dict[str, _Box] = {}
        self.text: dict[str, list[str]] = {}
        self.head: dict[str, float] = {}
        self.order = run_order(g)

    def measure(self, ident: str) -> _Box:
        g = self.g
        if ident in g.nodes:
            n = g.nodes[ident]
            if n.kind == "join":
                box = _Box(10, 10)
            else:
                lines = _lines(n.label, n.detail)
                self.text[ident] = lines
                width = max((len(t) for t in lines), default=1) * CHAR_W + 2 * PAD_X
                box = _Box(max(70.0, width), len(lines) * LINE_H + 2 * PAD_Y)
            self.boxes[ident] = box
            return box
        c = g.clusters[ident]
        kids = [self.measure(k) for k in self.order[ident]]
        if c.layout == "row":
            w = sum(k.w for k in kids) + GAP_ROW * max(0, len(kids) - 1)
            h = max((k.h for k in kids), default=0.0)
        else:
            w = max((k.w for k in kids), default=0.0)
            h = sum(k.h for k in kids) + GAP_COL * max(0, len(kids) - 1)
        if c.visible:
            lines = _lines(c.label, c.detail, 2 * MAX_CHARS)
            self.text[ident] = lines
            head = len(lines) * LINE_H + 6
            self.head[ident] = head
            w = max(w, max((len(t) for t in lines), default=0) * CHAR_W) + 2 * CLUSTER_PAD
            h = h + head + 2 * CLUSTER_PAD
        box = _Box(w, h)
        self.boxes[ident] = box
        return box

    def place(self, ident: str, x: float, y: float) -> None:
        box = self.boxes[ident]
        box.x, box.y = x, y
        if ident in self.g.nodes:
            return
        c = self.g.clusters[ident]
        inner_x, inner_y, inner_w = x, y, box.w
        if c.visible:
            inner_x += CLUSTER_PAD
            inner_y += CLUSTER_PAD + self.head[ident]
            inner_w -= 2 * CLUSTER_PAD
        children = self.order[ident]
        kids = [self.boxes[k] for k in children]
        if c.layout == "row":
            total = sum(k.w for k in kids) + GAP_ROW * max(0, len(kids) - 1)
            cx = inner_x + (inner_w - total) / 2
            for k_id, k in zip(children, kids, strict=True):
                self.place(k_id, cx, inner_y)
                cx += k.w + GAP_ROW
        else:
            cy = inner_y
            for k_id, k in zip(children, kids, strict=True):
                self.place(k_id, inner_x + (inner_w - k.w) / 2, cy)
                cy += k.h + GAP_COL


def _f(v: float) -> str:
    return f"{v:.1f}".rstrip("0").rstrip(".")


def _node_shape(kind: str, b: _Box, fill: str, stroke: str) -> str:
    x, y, w, h = b.x, b.y, b.w, b.h
    paint = f'fill="{fill}" stroke="{stroke}"'
    if kind in ("decision", "condition"):
        d = min(12.0, h / 2)
        pts = [
            (x + d, y),
            (x + w - d, y),
            (x + w, y + h / 2),
            (x + w - d, y + h),
            (x + d, y + h),
            (x, y + h / 2),
        ]
        return f'<polygon points="{" ".join(f"{_f(a)},{_f(c)}" for a, c in pts)}" {paint}/>'
    if kind == "join":
        # The dot fills its box, so the arrows that end at the box touch it.
        return f'<circle cx="{_f(x + w / 2)}" cy="{_f(y + h / 2)}" r="{_f(w / 2)}" {paint}/>'
    radius = h / 2 if kind in ("start", "end") else 5 if kind == "function" else 2
    return f'<rect x="{_f(x)}" y="{_f(y)}" width="{_f(w)}" height="{_f(h)}" rx="{_f(radius)}" {paint}/>'


def _clusters(g: Graph, lay: _Layout) -> list[str]:
    out = []
    for c in g.clusters.values():
        if not c.visible:
            continue
        b = lay.boxes[c.id]
        out.append(
            f'<g class="cluster k-{c.kind}"><rect x="{_f(b.x)}" y="{_f(b.y)}" width="{_f(b.w)}" '
            f'height="{_f(b.h)}" rx="6" fill="none" stroke="#aaa" stroke-dasharray="4 3"/>'
        )
        for i, line in enumerate(lay.text[c.id]):
            weight = ' font-weight="bold"' if i == 0 else ""
            y = b.y + 14 + i * LINE_H
            out.append(f'<text x="{_f(b.x + 8)}" y="{_f(y)}" fill="#555"{weight}>{escape(line)}</text>')
        out.append("</g>")
    return out


def _edges(g: Graph, lay: _Layout) -> list[str]:
    out = []
    back = 0  # arrows going back up (loops) are spread out on the right
    for e in g.edges:
        s, t = lay.boxes[e.source], lay.boxes[e.target]
        dashed = ' stroke-dasharray="5 4"' if e.kind in ("loop", "default") else ""
        if e.kind == "loop" or t.y + t.h <= s.y:
            bend = max(s.x + s.w, t.x + t.w) + 30 + 24 * back
            back += 1
            x1, y1, x2, y2 = s.x + s.w, s.y + s.h / 2, t.x + t.w, t.y + t.h / 2
            d = f"M{_f(x1)},{_f(y1)} C{_f(bend)},{_f(y1)} {_f(bend)},{_f(y2)} {_f(x2)},{_f(y2)}"
            lx, ly, anchor = bend - 4, (y1 + y2) / 2, "end"
        else:
            x1, y1, x2, y2 = s.x + s.w / 2, s.y + s.h, t.x + t.w / 2, t.y
            mid = (y1 + y2) / 2
            d = f"M{_f(x1)},{_f(y1)} C{_f(x1)},{_f(mid)} {_f(x2)},{_f(mid)} {_f(x2)},{_f(y2)}"
            lx, ly, anchor = (x1 + x2) / 2 + 4, y2 - 8, "start"
        out.append(
            f'<path class="edge k-{e.kind}" d="{d}" fill="none" stroke="#666"{dashed} '
            'marker-end="url(#sf-arrow)"/>'
        )
        if e.label:
            out.append(
                f'<text class="edge-label" x="{_f(lx)}" y="{_f(ly)}" text-anchor="{anchor}" fill="#444">'
                f"{escape(clean_text(e.label, limit=60))}</text>"
            )
    return out


def _nodes(g: Graph, lay: _Layout, key_prefix: str) -> list[str]:
    out = []
    for n in g.nodes.values():
        b = lay.boxes[n.id]
        fill, stroke = STYLE.get(n.kind, ("#ffffff", "#666666"))
        attrs = f" data-path={quoteattr(key_prefix + clean_text(n.path))}" if n.path is not None else ""
        out.append(f'<g class="node k-{n.kind}"{attrs}>')
        tip = "\n".join(filter(None, [clean_text(n.path or ""), clean_text(n.label), clean_text(n.detail)]))
        if tip:
            out.append(f"<title>{escape(tip)}</title>")
        out.append(_node_shape(n.kind, b, fill, stroke))
        for i, line in enumerate(lay.text.get(n.id, [])):
            weight = ' font-weight="bold"' if i == 0 else ""
            out.append(
                f'<text x="{_f(b.x + b.w / 2)}" y="{_f(b.y + PAD_Y + 11 + i * LINE_H)}" '
                f'text-anchor="middle"{weight}>{escape(line)}</text>'
            )
        out.append("</g>")
    return out


def graph_svg(g: Graph, *, key_prefix: str = "") -> str:
    """The graph as an ``<svg>`` element; stage nodes carry ``data-path``: ``key_prefix`` and their
    stage path (the report's row key)."""
    if g.root is None:
        return '<svg class="graph" width="0" height="0"></svg>'
    lay = _Layout(g)
    y = width = 0.0
    for r in (c.id for c in g.clusters.values() if c.parent is None):
        box = lay.measure(r)
        lay.place(r, 20, 10 + y)
        y += box.h + GAP_COL
        width = max(width, box.w)
    backs = sum(1 for e in g.edges if e.kind == "loop")
    w, h = _f(width + 80 + 24 * backs), _f(y + 10)
    head = [
        f'<svg class="graph" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'viewBox="0 0 {w} {h}" role="img">',
        '<defs><marker id="sf-arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
        'orient="auto-start-reverse"><path d="M0,0L10,5L0,10z" fill="#666"/></marker></defs>',
    ]
    return "\n".join([*head, *_clusters(g, lay), *_edges(g, lay), *_nodes(g, lay, key_prefix), "</svg>"])
