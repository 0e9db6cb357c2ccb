"""The graph model of a pipeline: nodes, edges and clusters, JSON-serialisable.

A :class:`Graph` is plain data. :func:`stageflow.observe.graph.graph_of` builds one by walking the
objects a pipeline runs; the Mermaid, Graphviz and report renderers only read it, so a graph saved
in a trace (``graph.to_dict()``) draws the same picture later, without the pipeline.

Clusters form a tree (``Graph.root`` is the outermost). Each cluster lists its children (node and
cluster ids) in order and says how to lay them out: ``column`` (top to bottom, the order they run)
or ``row`` (side by side: alternatives or concurrent work). A cluster with ``visible=False`` only
groups for layout; renderers draw its children directly in its parent.

Examples:
    >>> g = Graph(title="demo")
    >>> root = g.add_cluster("SequentialPipeline", kind="sequential", path="")
    >>> a = g.add_node("Predict", kind="predict", path="stages[0]", detail="question -> answer", cluster=root)
    >>> Graph.from_dict(g.to_dict()).nodes[a].detail
    'question -> answer'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from stageflow.errors import ConfigurationError

__all__ = ["GRAPH_VERSION", "Cluster", "Edge", "Graph", "Node", "clean_text"]

GRAPH_VERSION = 1

Layout = Literal["column", "row"]

# Characters no renderer can carry: C0/C1 controls except tab and newline, and lone surrogates
# (which cannot be encoded as UTF-8).
_IDENT = re.compile(r"[nc][0-9]{1,9}")
_KIND = re.compile(r"[a-z_]{1,30}")
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


def clean_text(value: Any, limit: int = 400) -> str:
    """``value`` as text any renderer can carry: unprintable characters become ``\\ufffd``,
    carriage returns become newlines, and text longer than ``limit`` is cut with ``…``.

    Examples:
        >>> clean_text("a\\x00b\\r\\nc")
        'a\\ufffdb\\nc'
    """
    text = value if isinstance(value, str) else str(value)
    text = _UNPRINTABLE.sub("\ufffd", text.replace("\r\n", "\n").replace("\r", "\n"))
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(frozen=True)
class Node:
    """One box of the picture.

    Attributes:
        id: Unique within the graph; safe as a Mermaid / DOT identifier (``n1``, ``n2``, ...).
        label: The first line: what the stage is (``Predict``, ``retrieve()``, ``branch?``).
        kind: ``predict``, ``module``, ``function``, ``pipeline`` (a pipeline drawn as one box),
            ``decision`` (a router or adapter choosing), ``condition`` (a loop's stopping
            condition), ``merge``, ``aggregate``, ``adapter``, ``join``, ``start``, ``end`` or
            ``cycle`` (a pipeline that contains itself).
        path: The stage path the engine uses in traces and errors (``stages[1].branches['math']``;
            ForEach items are ``stage[*]``); ``None`` for nodes that are not stages.
        detail: Further lines: a signature, the fields read and written, renames, policies.
        cluster: The id of the cluster holding the node.
    """

    id: str
    label: str
    kind: str
    path: str | None = None
    detail: str = ""
    cluster: str | None = None


@dataclass(frozen=True)
class Edge:
    """An arrow: ``kind`` is ``flow``, ``branch`` (a router's choice, labelled with the branch),
    ``default`` (taken when the router names no branch) or ``loop`` (back to a loop's start)."""

    source: str
    target: str
    label: str = ""
    kind: str = "flow"


@dataclass
class Cluster:
    """A group of nodes: a pipeline, a parallel group, or a layout-only grouping.

    Attributes:
        id: Unique within the graph (``c1``, ``c2``, ...).
        label: The heading (``IterativePipeline (at most 5 iterations)``).
        kind: The pattern (``sequential``, ``branching``, ``iterative``, ``parallel``, ``group``,
            ``foreach``, ``ensemble``, ``adaptive``, ``hierarchical``, ``error_handling``,
            ``cycle``) or ``layout`` (an invisible grouping).
        path: The stage path of the pipeline (``""`` for the outermost).
        parent: The enclosing cluster's id (``None`` for the root).
        layout: ``column`` or ``row`` (see the module docstring).
        visible: ``False`` for layout-only groupings.
        detail: Further lines under the heading (options such as ``collect`` or ``on_clash``).
        children: Node and cluster ids, in order.
    """

    id: str
    label: str
    kind: str
    path: str | None = None
    parent: str | None = None
    layout: Layout = "column"
    visible: bool = True
    detail: str = ""
    children: list[str] = field(default_factory=list)


@dataclass
class Graph:
    """Nodes, edges and a tree of clusters (see the module docstring)."""

    title: str = ""
    nodes: dict[str, Node] = field(default_factory=dict)
    edges: list[Edge] = field(default_factory=list)
    clusters: dict[str, Cluster] = field(default_factory=dict)
    root: str | None = None

    # -- building -------------------------------------------------------------------------------
    def add_cluster(
        self,
        label: str,
        *,
        kind: str,
        path: str | None = None,
        parent: str | None = None,
        layout: Layout = "column",
        visible: bool = True,
        detail: str = "",
    ) -> str:
        """Add a cluster under ``parent`` (the first one without a parent is the root); return its id."""
        cid = f"c{len(self.clusters) + 1}"
        self.clusters[cid] = Cluster(
            cid, clean_text(label), kind, path, parent, layout, visible, clean_text(detail)
        )
        if parent is not None:
            self.clusters[parent].children.append(cid)
        elif self.root is None:
            self.root = cid
        return cid

    def add_node(
        self,
        label: str,
        *,
        kind: str,
        path: str | None = None,
        detail: str = "",
        cluster: str | None = None,
    ) -> str:
        """Add a node to ``cluster``; return its id."""
        nid = f"n{len(self.nodes) + 1}"
        self.nodes[nid] = Node(nid, clean_text(label), kind, path, clean_text(detail), cluster)
        if cluster is not None:
            self.clusters[cluster].children.append(nid)
        return nid

    def add_edge(self, source: str, target: str, label: str = "", kind: str = "flow") -> None:
        """Add an arrow from ``source`` to ``target``."""
        self.edges.append(Edge(source, target, clean_text(label), kind))

    # -- reading --------------------------------------------------------------------------------
    def stage_paths(self) -> list[str]:
        """The stage paths of the nodes that are stages, in drawing order."""
        return [n.path for n in self.nodes.values() if n.path is not None]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``Graph.from_dict`` reads it back)."""
        return {
            "version": GRAPH_VERSION,
            "title": self.title,
            "root": self.root,
            "clusters": [
                {
                    "id": c.id,
                    "label": c.label,
                    "kind": c.kind,
                    "path": c.path,
                    "parent": c.parent,
                    "layout": c.layout,
                    "visible": c.visible,
                    "detail": c.detail,
                    "children": list(c.children),
                }
                for c in self.clusters.values()
            ],
            "nodes": [
                {
                    "id": n.id,
                    "label": n.label,
                    "kind": n.kind,
                    "path": n.path,
                    "detail": n.detail,
                    "cluster": n.cluster,
                }
                for n in self.nodes.values()
            ],
            "edges": [
                {"source": e.source, "target": e.target, "label": e.label, "kind": e.kind} for e in self.edges
            ],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Graph:
        """Read a dict written by :meth:`to_dict`; a malformed one raises :class:`ConfigurationError`."""
        try:
            version = data.get("version")
            if version != GRAPH_VERSION:
                raise ValueError(f"version {version!r} (this stageflow reads version {GRAPH_VERSION})")
            g = cls(title=str(data.get("title", "")), root=data.get("root"))
            for c in data["clusters"]:
                cluster = Cluster(**c)
                cluster.children = list(cluster.children)
                g.clusters[cluster.id] = cluster
            for n in data["nodes"]:
                node = Node(**n)
                g.nodes[node.id] = node
            g.edges = [Edge(**e) for e in data["edges"]]
            g._check()
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigurationError(
                f"Not a stageflow graph: {type(exc).__name__}: {exc}.",
                code="bad_graph",
                hint="pass the dict that Graph.to_dict() or stageflow.observe.graph_of(p).to_dict() returns",
            ) from exc
        return g

    def _check(self) -> None:
        ids = set(self.nodes) | set(self.clusters)
        for ident in ids:
            if not _IDENT.fullmatch(ident):
                raise ValueError(f"id {ident!r} is not of the form n1 / c1")
        for kind in [n.kind for n in self.nodes.values()] + [c.kind for c in self.clusters.values()]:
            if not _KIND.fullmatch(kind):
                raise ValueError(f"kind {kind!r} is not a lower-case word")
        if self.root is not None and self.root not in self.clusters:
            raise ValueError(f"root {self.root!r} is not a cluster")
        for c in self.clusters.values():
            if c.layout not in ("column", "row"):
                raise ValueError(f"cluster {c.id!r} has layout {c.layout!r}")
            for child in c.children:
                if child not in ids:
                    raise ValueError(f"cluster {c.id!r} lists unknown child {child!r}")
        for e in self.edges:
            if e.source not in self.nodes or e.target not in self.nodes:
                raise ValueError(f"edge {e.source!r} -> {e.target!r} names an unknown node")
