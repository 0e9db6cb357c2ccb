"""The report's picture: children stacked in run order, so every arrow but a loop's points down."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import dspy
import pytest
from observe_kit import every_pattern, fn

import stageflow
from stageflow.observe.graph import Graph, graph_of
from stageflow.observe.report.svg import graph_svg, run_order

_EDGE = re.compile(r'<path class="edge k-(\w+)" d="M([-\d.]+),([-\d.]+) C[^"]* ([-\d.]+),([-\d.]+)"')


def branch_then_parallel() -> stageflow.SequentialPipeline:
    """A branch (two exits) followed by a parallel group (two entries): joined by one join point."""
    return stageflow.SequentialPipeline(
        [
            stageflow.BranchingPipeline(
                stageflow.lm_router(["short", "long"]),
                {
                    "short": dspy.Predict("question -> answer"),
                    "long": dspy.ChainOfThought("question -> answer"),
                },
            ),
            stageflow.ParallelPipeline(
                [[dspy.Predict("answer -> summary"), dspy.Predict("answer -> keywords: list[str]")]]
            ),
            stageflow.IterativePipeline(
                [fn("improve", ["answer"], ["quality_score"], 0.95)],
                stageflow.QualityBasedStopping(quality_threshold=0.9),
                max_iterations=3,
            ),
        ]
    )


def arrows(svg: str) -> list[tuple[str, float, float]]:
    """``(kind, y where it leaves, y where it arrives)`` of every arrow of the picture."""
    return [(kind, float(y1), float(y2)) for kind, _, y1, _, y2 in _EDGE.findall(svg)]


def pointing_up(g: Graph) -> list[tuple[str, float, float]]:
    drawn = arrows(graph_svg(g))
    assert len(drawn) == len(g.edges)
    return [a for a in drawn if a[0] != "loop" and a[2] <= a[1]]


def test_a_join_point_sits_between_the_blocks_it_joins() -> None:
    g = graph_of(branch_then_parallel())
    [join] = [n.id for n in g.nodes.values() if n.kind == "join"]
    outer = g.clusters[g.nodes[join].cluster or ""]
    kinds = [g.clusters[k].kind if k in g.clusters else g.nodes[k].kind for k in outer.children]
    assert kinds == ["branching", "join", "parallel", "iterative"]


@pytest.mark.parametrize("program", [branch_then_parallel, every_pattern])
def test_every_arrow_but_a_loops_points_down(program: object) -> None:
    g = graph_of(program())  # type: ignore[operator]
    assert any(n.kind == "join" for n in g.nodes.values())
    assert pointing_up(g) == []
    assert any(kind == "loop" for kind, _, _ in arrows(graph_svg(g)))  # the loop still goes back up


def test_a_graph_saved_with_the_join_listed_last_is_drawn_in_run_order() -> None:
    # Traces written before the fix list the join point after the blocks of its cluster.
    doc = graph_of(branch_then_parallel()).to_dict()
    [join] = [n["id"] for n in doc["nodes"] if n["kind"] == "join"]
    [holder] = [c for c in doc["clusters"] if join in c["children"]]
    holder["children"].remove(join)
    holder["children"].append(join)
    old = Graph.from_dict(doc)
    assert old.clusters[holder["id"]].children[-1] == join
    assert run_order(old)[holder["id"]].index(join) == 1
    assert pointing_up(old) == []


def test_run_order_keeps_the_listed_order_when_arrows_say_nothing_or_disagree() -> None:
    g = Graph()
    c = g.add_cluster("P", kind="sequential", path="")
    a, b, d = (g.add_node(x, kind="function", cluster=c) for x in "abd")
    assert run_order(g)[c] == [a, b, d]
    g.add_edge(d, a)
    g.add_edge(a, d)  # a cycle: nothing to go by, the listed order stays
    g.add_edge(b, a, kind="loop")  # a loop's arrow goes back up: it never reorders
    assert run_order(g)[c] == [a, b, d]


# -- geometry: read back from the SVG itself ------------------------------------------------------
Box = tuple[float, float, float, float]  # x, y, width, height
_NS = "{http://www.w3.org/2000/svg}"


def _shape_box(el: ET.Element) -> Box:
    if el.tag == f"{_NS}rect":
        return tuple(float(el.get(k, "0")) for k in ("x", "y", "width", "height"))  # type: ignore[return-value]
    if el.tag == f"{_NS}circle":
        cx, cy, r = (float(el.get(k, "0")) for k in ("cx", "cy", "r"))
        return cx - r, cy - r, 2 * r, 2 * r
    pts = [tuple(map(float, p.split(","))) for p in el.get("points", "").split()]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    return min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)


def drawn_boxes(svg: str) -> tuple[list[Box], list[Box]]:
    """The boxes of the picture's nodes and of its visible clusters."""
    root = ET.fromstring(svg)
    nodes: list[Box] = []
    clusters: list[Box] = []
    for g in root.iter(f"{_NS}g"):
        shape = next(iter(el for el in g if el.tag != f"{_NS}title"))
        cls = g.get("class", "")
        (nodes if cls.startswith("node ") else clusters).append(_shape_box(shape))
    return nodes, clusters


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _contains(outer: Box, inner: Box) -> bool:
    return (
        outer[0] <= inner[0]
        and outer[1] <= inner[1]
        and inner[0] + inner[2] <= outer[0] + outer[2]
        and inner[1] + inner[3] <= outer[1] + outer[3]
    )


def _on_edge_of(x: float, y: float, b: Box) -> bool:
    """``(x, y)`` lies on the border of ``b`` (to the 0.1 the SVG is written with)."""
    near = 0.11
    inside = b[0] - near <= x <= b[0] + b[2] + near and b[1] - near <= y <= b[1] + b[3] + near
    border = min(abs(x - b[0]), abs(x - b[0] - b[2]), abs(y - b[1]), abs(y - b[1] - b[3])) <= near
    return inside and border


def _par(tag: str) -> stageflow.ParallelPipeline:
    return stageflow.ParallelPipeline(
        [
            [fn(f"{tag}_a", ["question"], [f"{tag}_x"]), fn(f"{tag}_b", ["question"], [f"{tag}_y"])],
            fn(f"{tag}_c", [f"{tag}_x", f"{tag}_y"], ["answer"]),
        ]
    )


def _branch(arm: object, tag: str) -> stageflow.BranchingPipeline:
    route = fn(f"{tag}_route", ["question"], ["branch"], "arm")
    return stageflow.BranchingPipeline(
        route, {"arm": arm, "plain": fn(f"{tag}_plain", ["question"], ["answer"])}
    )


SHAPES = {
    "branch arm is a parallel group": lambda: _branch(_par("p"), "b"),
    "parallel member is a branch": lambda: stageflow.ParallelPipeline(
        [
            [_branch(fn("s", ["question"], ["answer"]), "b"), fn("t", ["question"], ["w"])],
            fn("u", ["w"], ["v"]),
        ]
    ),
    "branch then parallel then branch": lambda: stageflow.SequentialPipeline(
        [_branch(fn("s", ["question"], ["answer"]), "b1"), _par("p"), _branch(_par("q"), "b2")]
    ),
    "ForEach over a branch into a parallel group": lambda: stageflow.ForEach(
        _branch(_par("p"), "b"), over="questions", item="question", collect={"answer": "answers"}
    ),
    "nested: branch in a parallel group in a branch arm": lambda: _branch(
        stageflow.ParallelPipeline([[_branch(_par("p"), "inner"), fn("side", ["question"], ["w"])]]), "outer"
    ),
    "every pattern": every_pattern,
    "the user's report": branch_then_parallel,
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_no_two_boxes_overlap_and_every_arrow_joins_two_boxes(shape: str) -> None:
    g = graph_of(SHAPES[shape]())
    svg = graph_svg(g)
    nodes, clusters = drawn_boxes(svg)
    assert len(nodes) == len(g.nodes)
    assert len(clusters) == sum(1 for c in g.clusters.values() if c.visible)
    # Nodes never touch one another; clusters either nest or stay apart, and a node is either
    # inside a cluster or outside it, never across its border.
    for i, a in enumerate(nodes):
        for b in nodes[i + 1 :]:
            assert not _overlap(a, b), (a, b)
        for c in clusters:
            assert _contains(c, a) or not _overlap(a, c), (a, c)
    for i, a in enumerate(clusters):
        for b in clusters[i + 1 :]:
            assert _contains(a, b) or _contains(b, a) or not _overlap(a, b), (a, b)
    # Every arrow leaves the border of one node and arrives at the border of another.
    ends = [(float(x1), float(y1), float(x2), float(y2)) for _, x1, y1, x2, y2 in _EDGE.findall(svg)]
    assert len(ends) == len(g.edges)
    for x1, y1, x2, y2 in ends:
        starts = [b for b in nodes if _on_edge_of(x1, y1, b)]
        arrives = [b for b in nodes if _on_edge_of(x2, y2, b)]
        assert starts, (x1, y1)
        assert arrives, (x2, y2)
        assert starts != arrives
    assert pointing_up(g) == []
