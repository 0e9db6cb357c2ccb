"""The schedule of a run: the critical path is the longest chain, and ideal <= critical path <= wall."""

from __future__ import annotations

from itertools import combinations, pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stageflow.observe.schedule import SpanNode, critical_path, critical_time, ideal_time

TICK = 1 / 8  # times are multiples of a power of two, so every sum below is exact


def test_a_fan_outs_longest_item_is_on_the_path_not_the_last_to_finish() -> None:
    # Seen in `stageflow run --profile`: the slow item started first, a short one later and ended last.
    fan = SpanNode("fan", 0.0, 2.2, [SpanNode("fan.stage[0]", 0.0, 2.0), SpanNode("fan.stage[1]", 1.8, 2.2)])
    run = SpanNode("", 0.0, 2.2, [fan])
    assert [s.path for s in critical_path(run)] == ["fan.stage[0]"]
    assert critical_time(run) == pytest.approx(2.0)
    assert ideal_time(run) == pytest.approx(2.0)
    assert ideal_time(run) <= critical_time(run) <= run.elapsed


def test_items_queued_for_workers_make_a_chain() -> None:
    items = [
        SpanNode("it[0]", 0.0, 1.0),
        SpanNode("it[1]", 0.0, 0.5),
        SpanNode("it[2]", 0.5, 1.5),
        SpanNode("it[3]", 1.0, 2.0),
    ]
    run = SpanNode("", 0.0, 2.0, [SpanNode("fan", 0.0, 2.0, items)])
    assert [s.path for s in critical_path(run)] == ["it[0]", "it[3]"]
    assert [s.start for s in critical_path(run)] == [0.0, 1.0]
    assert (critical_time(run), ideal_time(run)) == (2.0, 1.0)


def test_a_child_past_its_parents_end_cannot_break_the_invariant() -> None:
    # Clock readings of a child that stray past its parent (a few microseconds in real runs).
    run = SpanNode("", 0.0, 1.0, [SpanNode("a", 0.0, 0.6), SpanNode("b", 0.6, 1.000001)])
    assert ideal_time(run) <= critical_time(run) <= run.elapsed


def test_a_run_without_stages() -> None:
    run = SpanNode("", 0.0, 1.0)
    assert (critical_path(run), critical_time(run), ideal_time(run)) == ([], 0.0, 0.0)


@st.composite
def run_trees(draw: st.DrawFn) -> SpanNode:
    """A run tree of any shape: each span's children are random intervals inside it."""

    def build(path: str, start: int, end: int, depth: int) -> SpanNode:
        node = SpanNode(path, start * TICK, end * TICK, cancelled=bool(path) and draw(st.integers(0, 4)) == 0)
        if depth < 3:
            for i in range(draw(st.integers(0, 4))):
                a = draw(st.integers(start, end))
                b = draw(st.integers(a, end))
                node.children.append(build(f"{path}.s[{i}]", a, b, depth + 1))
        return node

    return build("", 0, draw(st.integers(0, 80)), 0)


def _ran(node: SpanNode) -> list[SpanNode]:
    return [child for child in node.children if not child.cancelled]


def _leaves(node: SpanNode) -> list[SpanNode]:
    if not _ran(node):
        return [node]
    return [leaf for child in _ran(node) for leaf in _leaves(child)]


def _brute_force(node: SpanNode) -> float:
    """The longest chain by trying every set of children (not stopped from outside) that ran one
    after another."""
    children = _ran(node)
    if not children:
        return node.elapsed
    best = 0.0
    for size in range(1, len(children) + 1):
        for group in combinations(sorted(children, key=lambda c: (c.start, c.end)), size):
            if all(a.end <= b.start for a, b in pairwise(group)):
                best = max(best, sum(_brute_force(c) for c in group))
    return best


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(run_trees())
def test_ideal_le_critical_path_le_wall_for_every_run_shape(run: SpanNode) -> None:
    steps = critical_path(run)
    length = critical_time(run)
    assert ideal_time(run) <= length <= run.elapsed
    # The path is the longest chain: as long as brute force finds, and its steps add up to it.
    assert length == (_brute_force(run) if _ran(run) else 0.0)
    assert sum(s.elapsed for s in steps) == length
    # Stages that ran one after another, in order; and no stage alone outlasts the path.
    assert all(a.start + a.elapsed <= b.start for a, b in pairwise(steps))
    if _ran(run):
        assert length >= max(leaf.elapsed for leaf in _leaves(run))
    # A stage stopped from outside is never on it (what stopped it decided when things ended).
    stopped = {id(n) for n in _all(run) if n.cancelled}
    on_path = {s.path for s in steps}
    assert not any(n.path in on_path for n in _all(run) if id(n) in stopped)


def _all(node: SpanNode) -> list[SpanNode]:
    return [node, *(n for child in node.children for n in _all(child))]


def test_a_failed_items_stopped_siblings_are_not_the_path() -> None:
    """(session 34's open item) A fail-fast fan-out: the item that failed stopped the others, which
    ended a moment after it; the path went through one of those, the tie going to the later end."""
    items = [
        SpanNode("fan.stage[0]", 0.0, 0.5),
        SpanNode("fan.stage[1]", 0.0, 0.5 + TICK, cancelled=True),
        SpanNode("fan.stage[2]", 0.25, 0.5 + TICK, cancelled=True),
    ]
    run = SpanNode("", 0.0, 1.0, [SpanNode("fan", 0.0, 0.75, items)])
    assert [s.path for s in critical_path(run)] == ["fan.stage[0]"]
    assert (critical_time(run), ideal_time(run)) == (0.5, 0.5)


def test_a_span_whose_children_were_all_stopped_counts_as_one_stage() -> None:
    timed_out = SpanNode("slow", 0.0, 2.0, [SpanNode("slow.inner", 0.0, 2.0, cancelled=True)])
    run = SpanNode("", 0.0, 2.0, [timed_out])
    assert [s.path for s in critical_path(run)] == ["slow"]
    assert (critical_time(run), ideal_time(run)) == (2.0, 2.0)
