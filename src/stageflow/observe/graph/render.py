"""Mermaid and Graphviz DOT text for a :class:`Graph` (or anything :func:`graph_of` accepts).

Every piece of user text (labels, signatures, branch names, paths) is escaped for the target
language, so a field name holding quotes, brackets, ``-->``, newlines or HTML cannot break the
diagram or inject markup: Mermaid gets entity codes (``#34;``) for everything but plain
characters, DOT gets quoted strings with ``\\``, ``"`` and ``&`` escaped. Identifiers are the
graph's own ``n1`` / ``c1``.

Examples:
    >>> import stageflow
    >>> p = stageflow.SequentialPipeline([stageflow.stage(lambda q: {"a": q}, writes=["a"], name="echo")])
    >>> print(to_mermaid(p))  # doctest: +NORMALIZE_WHITESPACE
    flowchart TD
      n1(["start<br/>q"])
      subgraph c2["SequentialPipeline"]
        direction TB
        n2("echo()<br/>q -> a")
      end
      n3(["end<br/>a"])
      n1 --> n2
      n2 --> n3
      classDef sf_start fill:#f4f4f4,stroke:#888888
      classDef sf_function fill:#eef7ee,stroke:#4a8a4a
      classDef sf_end fill:#f4f4f4,stroke:#888888
      class n1 sf_start
      class n2 sf_function
      class n3 sf_end
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from stageflow.observe.graph.model import Edge, Graph, clean_text

__all__ = ["STYLE", "as_graph", "dot_text", "mermaid_text", "render_svg", "to_dot", "to_mermaid"]

_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 _.,:/'=+*?!@~-()[]>")

# Fill and stroke per node kind (the same palette in Mermaid, DOT and the HTML report).
STYLE: dict[str, tuple[str, str]] = {
    "predict": ("#e8f0fe", "#4a6fb5"),
    "module": ("#e8f0fe", "#4a6fb5"),
    "pipeline": ("#e8f0fe", "#4a6fb5"),
    "function": ("#eef7ee", "#4a8a4a"),
    "decision": ("#fff4dc", "#b58a2a"),
    "condition": ("#fff4dc", "#b58a2a"),
    "adapter": ("#fff4dc", "#b58a2a"),
    "merge": ("#f3eefa", "#7a5aa8"),
    "aggregate": ("#f3eefa", "#7a5aa8"),
    "join": ("#888888", "#888888"),
    "start": ("#f4f4f4", "#888888"),
    "end": ("#f4f4f4", "#888888"),
    "cycle": ("#fdecea", "#b54a4a"),
}


def as_graph(obj: Any) -> Graph:
    """``obj`` if it is a :class:`Graph`, a graph read from a ``to_dict()`` mapping, or
    :func:`graph_of` of a pipeline or stage."""
    if isinstance(obj, Graph):
        return obj
    if isinstance(obj, Mapping):
        return Graph.from_dict(obj)
    from stageflow.observe.graph.walk import graph_of

    return graph_of(obj)


def _text(node_label: Any, detail: Any) -> list[str]:
    lines = [clean_text(node_label)] if node_label != "" else []
    if detail:
        lines += clean_text(detail).split("\n")
    return lines


def _walk(g: Graph, cid: str) -> Iterator[tuple[str, str]]:
    """``("open", cid)``, ``("node", nid)``, ``("close", cid)`` in drawing order; invisible
    clusters contribute their children only."""
    c = g.clusters[cid]
    if c.visible:
        yield "open", cid
    for child in c.children:
        if child in g.clusters:
            yield from _walk(g, child)
        else:
            yield "node", child
    if c.visible:
        yield "close", cid


def _ordered_edges(g: Graph) -> list[Edge]:
    """Edges in the order of their nodes (top to bottom), so the text reads like the flow."""
    rank = {nid: i for i, nid in enumerate(g.nodes)}
    return sorted(g.edges, key=lambda e: (rank.get(e.source, -1), rank.get(e.target, -1)))


def _roots(g: Graph) -> list[str]:
    return [c.id for c in g.clusters.values() if c.parent is None]


# -- Mermaid ------------------------------------------------------------------------------------------
def _mm(text: str) -> str:
    out = []
    for ch in text:
        if ch in _PLAIN or (ord(ch) > 0x7F and ch.isprintable()):
            out.append(ch)
        elif ch == "\n":
            out.append("<br/>")
        else:
            out.append(f"#{ord(ch)};")
    return "".join(out)


_MM_SHAPES: dict[str, tuple[str, str]] = {
    "start": ('(["', '"])'),
    "end": ('(["', '"])'),
    "decision": ('{"', '"}'),
    "condition": ('{"', '"}'),
    "merge": ('{{"', '"}}'),
    "aggregate": ('{{"', '"}}'),
    "function": ('("', '")'),
    "join": ('(("', '"))'),
    "cycle": ('>"', '"]'),
}


def mermaid_text(g: Graph) -> str:
    """Mermaid flowchart text of ``g``."""
    lines = ["flowchart TD"]
    depth = 1
    for what, ident in (step for root in _roots(g) for step in _walk(g, root)):
        pad = "  " * depth
        if what == "open":
            c = g.clusters[ident]
            title = "<br/>".join(_mm(t) for t in _text(c.label, c.detail)) or " "
            lines.append(f'{pad}subgraph {ident}["{title}"]')
            lines.append(f"{pad}  direction {'LR' if c.layout == 'row' else 'TB'}")
            depth += 1
        elif what == "close":
            depth -= 1
            lines.append("  " * depth + "end")
        else:
            n = g.nodes[ident]
            opening, closing = _MM_SHAPES.get(n.kind, ('["', '"]'))
            text = "<br/>".join(_mm(t) for t in _text(n.label, n.detail)) or " "
            lines.append(f"{pad}{ident}{opening}{text}{closing}")
    for e in _ordered_edges(g):
        arrow = "-.->" if e.kind in ("loop", "default") else "-->"
        label = f'|"{_mm(clean_text(e.label))}"|' if e.label else ""
        lines.append(f"  {e.source} {arrow}{label} {e.target}")
    kinds: dict[str, list[str]] = {}
    for n in g.nodes.values():
        if n.kind in STYLE:
            kinds.setdefault(n.kind, []).append(n.id)
    for kind in kinds:
        fill, stroke = STYLE[kind]
        lines.append(f"  classDef sf_{kind} fill:{fill},stroke:{stroke}")
    for kind, ids in kinds.items():
        lines.append(f"  class {','.join(ids)} sf_{kind}")
    return "\n".join(lines)


def to_mermaid(pipeline: Any) -> str:
    """Mermaid flowchart of a pipeline (or a :class:`Graph`, or its ``to_dict()``).

    GitHub and many editors render it in a ```` ```mermaid ```` block; nothing is fetched.
    """
    return mermaid_text(as_graph(pipeline))


# -- Graphviz DOT -------------------------------------------------------------------------------------
def _dq(text: str) -> str:
    """A DOT quoted string whose content Graphviz shows literally."""
    body = (
        clean_text(text, limit=2000)
        .replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("&", "&amp;")
        .replace("\n", "\\n")
    )
    return f'"{body}"'


_DOT_SHAPES = {
    "start": "oval",
    "end": "oval",
    "decision": "diamond",
    "condition": "diamond",
    "merge": "hexagon",
    "aggregate": "hexagon",
    "join": "point",
    "cycle": "cds",
}


def dot_text(g: Graph) -> str:
    """Graphviz DOT text of ``g`` (render it with ``dot -Tsvg``)."""
    lines = [
        "digraph stageflow {",
        '  graph [rankdir=TB, fontname="Helvetica", fontsize=11, newrank=true];',
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    depth = 1
    for what, ident in (step for root in _roots(g) for step in _walk(g, root)):
        pad = "  " * depth
        if what == "open":
            c = g.clusters[ident]
            lines.append(f"{pad}subgraph cluster_{ident} {{")
            title = "\n".join(_text(c.label, c.detail))
            lines.append(f'{pad}  label={_dq(title)}; style="rounded,dashed"; color="#999999";')
            depth += 1
        elif what == "close":
            depth -= 1
            lines.append("  " * depth + "}")
        else:
            n = g.nodes[ident]
            fill, stroke = STYLE.get(n.kind, ("#ffffff", "#666666"))
            attrs = [
                f"label={_dq(chr(10).join(_text(n.label, n.detail)))}",
                f"shape={_DOT_SHAPES.get(n.kind, 'box')}",
                f'fillcolor="{fill}"',
                f'color="{stroke}"',
            ]
            if n.path is not None:
                attrs.append(f"tooltip={_dq(n.path or '(the pipeline)')}")
            if n.kind == "join":
                attrs.append("width=0.08")
            lines.append(f"{pad}{ident} [{', '.join(attrs)}];")
    for e in _ordered_edges(g):
        attrs = []
        if e.label:
            attrs.append(f"label={_dq(e.label)}")
        if e.kind in ("loop", "default"):
            attrs.append("style=dashed")
        if e.kind == "loop":
            attrs.append("constraint=false")
        tail = f" [{', '.join(attrs)}]" if attrs else ""
        lines.append(f"  {e.source} -> {e.target}{tail};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_dot(pipeline: Any) -> str:
    """Graphviz DOT text of a pipeline (or a :class:`Graph`, or its ``to_dict()``)."""
    return dot_text(as_graph(pipeline))


def render_svg(pipeline: Any, *, dot_binary: str = "dot", timeout: float = 60.0) -> str:
    """SVG of a pipeline (or a :class:`Graph`), drawn by Graphviz's ``dot`` program, offline.

    Raises :class:`ConfigurationError` when ``dot`` is not installed (with the command that
    installs it) or rejects the input.
    """
    import shutil
    import subprocess

    from stageflow.errors import ConfigurationError

    exe = shutil.which(dot_binary)
    if exe is None:
        raise ConfigurationError(
            f"Drawing SVG needs Graphviz's '{dot_binary}' program, which is not on PATH.",
            code="graphviz_missing",
            hint="install Graphviz (Debian/Ubuntu: sudo apt-get install graphviz; "
            "macOS: brew install graphviz), or use --format dot / --format mermaid",
        )
    try:
        done = subprocess.run(
            [exe, "-Tsvg"],
            input=to_dot(pipeline).encode("utf-8"),
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise ConfigurationError(
            f"Graphviz '{exe}' took longer than {timeout:.0f}s.", code="graphviz_failed"
        ) from exc
    if done.returncode != 0:
        message = done.stderr.decode("utf-8", "replace").strip()
        raise ConfigurationError(
            f"Graphviz '{exe}' failed (exit {done.returncode}): {message}", code="graphviz_failed"
        )
    return done.stdout.decode("utf-8")
