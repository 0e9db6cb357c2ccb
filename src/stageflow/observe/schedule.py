"""Where a run's time went: its critical path, and the time a perfect parallel schedule would take.

Both are computed from the tree of stage spans of one pipeline call (start and end times, parents),
as the :class:`~stageflow.observe.profiler.Profiler` records it.

**Critical path.** Walk back from the end of the run: among the children of a span, take the one
that ended last; before it, the child that ended last before that one started; and so on. That
chain of siblings is what kept the parent busy until its end: making any other child faster would
not have ended the parent sooner. Each stage of the chain is then expanded the same way into its
own children, down to stages without children. With a ForEach, the chain goes through the slowest
item (and through whichever item it waited for when the items queued for workers); with a loop,
through every iteration; with a branch, through the branch taken.

**Perfect parallel schedule.** The time the run would take with unlimited workers and a framework
that costs nothing: a stage without children takes the time it took; a stage with children takes
the sum, over its *waves*, of the slowest member of each wave, where a wave is a maximal group of
children whose run times overlapped (the children of a fan-out — ForEach items, ensemble members,
a parallel group — overlap; stages in sequence do not). The definition trusts what was observed:
children that ran one after another are taken to depend on each other (a fan-out limited to one
worker counts as a sequence), and a stage's time includes any wait for a concurrency slot
(``stageflow.limits``). Time the pipelines themselves spent between their stages (merging,
contract checks, hooks) is left out, so ``ideal <= critical path <= wall``.

Examples:
    >>> run = SpanNode("", 0.0, 10.0, [
    ...     SpanNode("a", 0.0, 2.0),
    ...     SpanNode("fan", 2.0, 9.0, [SpanNode("fan.x", 2.0, 5.0), SpanNode("fan.y", 2.5, 8.5)]),
    ...     SpanNode("b", 9.0, 10.0),
    ... ])
    >>> [step.path for step in critical_path(run)]
    ['a', 'fan.y', 'b']
    >>> ideal_time(run)
    9.0
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CriticalStep", "SpanNode", "critical_path", "ideal_time"]


@dataclass
class SpanNode:
    """A span of the run tree: a stage call (or the run itself, path ``""``); times in seconds."""

    path: str
    start: float
    end: float
    children: list[SpanNode] = field(default_factory=list)

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


def _chain(children: list[SpanNode]) -> list[SpanNode]:
    """The siblings that determined the parent's end, first to last."""
    ordered = sorted(children, key=lambda c: c.end)
    ends = [c.end for c in ordered]
    current: SpanNode | None = ordered[-1]
    chain: list[SpanNode] = []
    while current is not None:
        chain.append(current)
        i = bisect_right(ends, current.start) - 1
        current = ordered[i] if i >= 0 and ordered[i] is not current else None
    chain.reverse()
    return chain


def critical_path(root: SpanNode) -> list[CriticalStep]:
    """The critical path of ``root``'s run (see the module docstring), as childless stages in order."""
    steps: list[CriticalStep] = []
    stack = [root]
    leaves: list[SpanNode] = []
    # Depth-first, keeping order: expand each span of the chain into its own chain.
    while stack:
        node = stack.pop()
        if not node.children:
            if node is not root:
                leaves.append(node)
            continue
        stack.extend(reversed(_chain(node.children)))
    for leaf in leaves:
        steps.append(CriticalStep(leaf.path, leaf.start - root.start, leaf.elapsed))
    return steps


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


def ideal_time(node: SpanNode) -> float:
    """The time a perfect parallel schedule would take for ``node`` (see the module docstring)."""
    if not node.children:
        return node.elapsed
    return sum(max(ideal_time(c) for c in wave) for wave in _waves(node.children))
