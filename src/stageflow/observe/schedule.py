"""Where a run's time went: its critical path, and the time a perfect parallel schedule would take.

Both are computed from the tree of stage spans of one pipeline call (start and end times, parents),
as the :class:`~stageflow.observe.profiler.Profiler` records it.

**Critical path.** The longest chain of stages that ran one after another. Among the children of a
span, a chain is a sequence of siblings each of which started after the previous one ended (so it
may have waited for it); its length is the sum of its members' own critical paths. The critical path
of a span is its longest chain, each member expanded the same way into its own children, down to
stages without children. Siblings whose run times overlapped are never in one chain: they ran side
by side. With a ForEach, the chain goes through the slowest item (and, when the items queued for
workers, through the longest sequence of items that ran one after another on them); with a loop,
through every iteration; with a branch, through the branch taken.

**Perfect parallel schedule.** The time the run would take with unlimited workers and a framework
that costs nothing: a stage without children takes the time it took; a stage with children takes
the sum, over its *waves*, of the slowest member of each wave, where a wave is a maximal group of
children whose run times overlapped (the children of a fan-out — ForEach items, ensemble members,
a parallel group — overlap; stages in sequence do not). The definition trusts what was observed:
children that ran one after another are taken to depend on each other (a fan-out limited to one
worker counts as a sequence), and a stage's time includes any wait for a concurrency slot
(``stageflow.limits``). Time the pipelines themselves spent between their stages (merging,
contract checks, hooks) is left out.

**Stopped stages.** A stage stopped from outside (``cancelled``: the other branches of a fail-fast
fan-out once one failed, those a quorum or a timeout left, a stage still running when its run
ended) did not decide when anything ended: what stopped it did. Both measures leave it out, and a
span whose children were all stopped counts as a stage of its own. With a fail-fast ``ForEach``,
the critical path goes through the item that failed, not through the items it stopped.

**The invariant** ``ideal <= critical path <= wall`` holds for every run: a perfect schedule's waves
follow one another, so one slowest member per wave is a chain, and a chain of stages that did not
overlap fits inside their parent's time. Both times are capped at each span's own time, so clock
readings of a child that stray past its parent cannot break it.

Examples:
    >>> run = SpanNode("", 0.0, 10.0, [
    ...     SpanNode("a", 0.0, 2.0),
    ...     SpanNode("fan", 2.0, 9.0, [SpanNode("fan.x", 2.0, 5.0), SpanNode("fan.y", 2.5, 8.5)]),
    ...     SpanNode("b", 9.0, 10.0),
    ... ])
    >>> [step.path for step in critical_path(run)]
    ['a', 'fan.y', 'b']
    >>> critical_time(run), ideal_time(run)
    (9.0, 9.0)

    A fan-out's slow item started first, a short one started later and ended last: the critical
    path goes through the slow one, not the one that ended last.

    >>> fan = SpanNode("", 0.0, 2.2, [SpanNode("slow", 0.0, 2.0), SpanNode("late", 1.8, 2.2)])
    >>> [step.path for step in critical_path(fan)], critical_time(fan), ideal_time(fan)
    (['slow'], 2.0, 2.0)

    Items that queued for two workers: the critical path follows the items that ran one after
    another, a perfect schedule runs them all at once.

    >>> queued = SpanNode("", 0.0, 2.0, [
    ...     SpanNode("it[0]", 0.0, 1.0), SpanNode("it[1]", 0.0, 0.5),
    ...     SpanNode("it[2]", 0.5, 1.5), SpanNode("it[3]", 1.0, 2.0),
    ... ])
    >>> [step.path for step in critical_path(queued)], critical_time(queued), ideal_time(queued)
    (['it[0]', 'it[3]'], 2.0, 1.0)

    The first item failed and stopped the other, which ended a moment later: the failure is the path.

    >>> stopped = SpanNode("it[1]", 0.0, 1.01, cancelled=True)
    >>> failed = SpanNode("", 0.0, 1.1, [SpanNode("it[0]", 0.0, 1.0), stopped])
    >>> [step.path for step in critical_path(failed)], critical_time(failed)
    (['it[0]'], 1.0)
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CriticalStep", "SpanNode", "critical_path", "critical_time", "ideal_time"]


@dataclass
class SpanNode:
    """A span of the run tree: a stage call (or the run itself, path ``""``); times in seconds."""

    path: str
    start: float
    end: float
    children: list[SpanNode] = field(default_factory=list)
    #: Stopped from outside before it ended by itself (see "Stopped stages" above).
    cancelled: bool = False

    @property
    def elapsed(self) -> float:
        """How long the span lasted."""
        return max(0.0, self.end - self.start)


@dataclass(frozen=True)
class CriticalStep:
    """One stage on the critical path: its path, start (seconds after the run started) and time."""

    path: str
    start: float
    elapsed: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {"path": self.path, "start": self.start, "elapsed": self.elapsed}


def _longest_chain(children: list[SpanNode], length: dict[int, float]) -> tuple[float, list[SpanNode]]:
    """The chain of siblings, each started after the previous one ended, whose lengths add up most.

    Weighted interval scheduling: with the children sorted by end, ``best[k]`` is the longest chain
    among the first ``k``; the ``k``-th child either extends the best chain of those that ended before
    it started, or is left out. A tie goes to the child that ended later.
    """
    ordered = sorted(children, key=lambda c: (c.end, c.start))
    ends = [c.end for c in ordered]
    best = [0.0] * (len(ordered) + 1)
    before: list[int | None] = [None] * len(ordered)  # None: the child is not on the best chain
    for k, child in enumerate(ordered):
        earlier = bisect_right(ends, child.start, 0, k)  # the siblings that ended before it started
        with_child = best[earlier] + length[id(child)]
        if with_child >= best[k]:
            best[k + 1], before[k] = with_child, earlier
        else:
            best[k + 1] = best[k]
    chain: list[SpanNode] = []
    k = len(ordered)
    while k > 0:
        back = before[k - 1]
        if back is None:
            k -= 1
        else:
            chain.append(ordered[k - 1])
            k = back
    chain.reverse()
    return best[-1], chain


def _ran(node: SpanNode) -> list[SpanNode]:
    """The children of ``node`` that were not stopped from outside."""
    children = node.children
    if any(child.cancelled for child in children):
        return [child for child in children if not child.cancelled]
    return children


def _solve(root: SpanNode) -> tuple[dict[int, float], dict[int, list[SpanNode]]]:
    """Each span's critical-path length (capped at its own time) and its longest chain of children."""
    length: dict[int, float] = {}
    chains: dict[int, list[SpanNode]] = {}
    # Children before parents, without recursion: run trees can be deep.
    order: list[SpanNode] = []
    stack = [root]
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(node.children)
    for node in reversed(order):
        children = _ran(node)
        if not children:
            length[id(node)] = node.elapsed if node is not root else 0.0
            chains[id(node)] = []
            continue
        total, chain = _longest_chain(children, length)
        length[id(node)] = min(total, node.elapsed)
        chains[id(node)] = chain
    return length, chains


def critical_path(root: SpanNode) -> list[CriticalStep]:
    """The critical path of ``root``'s run (see the module docstring), as childless stages in order."""
    _, chains = _solve(root)
    steps: list[CriticalStep] = []
    stack = list(reversed(chains[id(root)]))
    # Depth-first, keeping order: expand each span of the chain into its own chain.
    while stack:
        node = stack.pop()
        if chains[id(node)]:
            stack.extend(reversed(chains[id(node)]))
        else:
            steps.append(CriticalStep(node.path, node.start - root.start, node.elapsed))
    return steps


def critical_time(root: SpanNode) -> float:
    """The length of ``root``'s critical path: at least :func:`ideal_time`, at most the wall time.

    The times of :func:`critical_path`'s steps added up, capped at each span's own time (see the
    module docstring); a run without stages has ``0.0``.
    """
    return _solve(root)[0][id(root)]


def _waves(children: list[SpanNode]) -> list[list[SpanNode]]:
    waves: list[list[SpanNode]] = []
    wave_end = float("-inf")
    for child in sorted(children, key=lambda c: c.start):
        if waves and child.start < wave_end:
            waves[-1].append(child)
            wave_end = max(wave_end, child.end)
        else:
            waves.append([child])
            wave_end = child.end
    return waves


def _ideal(node: SpanNode) -> float:
    children = _ran(node)
    if not children:
        return node.elapsed
    return min(node.elapsed, sum(max(_ideal(c) for c in wave) for wave in _waves(children)))


def ideal_time(root: SpanNode) -> float:
    """The time a perfect parallel schedule would take for ``root``'s run (see the module docstring).

    A run without stages has ``0.0``: its time all went to the pipeline itself.
    """
    return _ideal(root) if _ran(root) else 0.0
