"""Branches a fan-out stops (a ForEach with ``on_error="fail_fast"``, an ensemble's quorum) end for
observers too: every ``before_stage`` gets its ``after_stage`` or ``on_stage_error``.

A cancelled task reports at once (``on_stage_error`` with ``cancelled=True``); a sync branch on a
thread cannot be stopped, so it reports its end when its thread finishes. The same scenarios run
from a sync call on threads, from a sync call of ``async def`` stages (stageflow's background loop)
and from ``acall``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import stageflow
from stageflow import EnsemblePipeline, ForEach, Hook, attach_hooks

MODES = ["sync call, thread stages", "sync call, async stages", "acall"]


class Ends(Hook):
    """Counts stage starts and ends per path; notes which ends were cancellations."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[str] = []
        self.ended: list[str] = []
        self.cancelled: list[str] = []

    def before_stage(self, *, path: str, **future: Any) -> None:
        with self.lock:
            self.started.append(path)

    def after_stage(self, *, path: str, **future: Any) -> None:
        with self.lock:
            self.ended.append(path)

    def on_stage_error(self, *, path: str, error: BaseException, **future: Any) -> None:
        with self.lock:
            self.ended.append(path)
            if future.get("cancelled"):
                assert isinstance(error, asyncio.CancelledError)
                self.cancelled.append(path)

    def unended(self) -> list[str]:
        with self.lock:
            left = list(self.started)
            for p in self.ended:
                left.remove(p)
            return left


def _stage(mode: str, work: Callable[[str], str], gate: threading.Event, field: str) -> Any:
    """A function stage writing ``field``; ``work`` returns ``"slow"`` for items that wait on ``gate``."""
    if mode == "sync call, thread stages":

        def blocking(x: str) -> dict[str, str]:
            if work(x) == "slow":
                gate.wait(5.0)
            elif work(x) == "fail":
                raise ValueError(f"bad item {x}")
            return {field: work(x)}

        return stageflow.stage(blocking, writes=[field])

    async def waiting(x: str) -> dict[str, str]:
        if work(x) == "slow":
            await asyncio.sleep(5.0)
        elif work(x) == "fail":
            await asyncio.sleep(0.01)
            raise ValueError(f"bad item {x}")
        return {field: work(x)}

    return stageflow.stage(waiting, writes=[field])


def _call(mode: str, pipeline: Any, **inputs: Any) -> Any:
    if mode == "acall":
        return asyncio.run(pipeline.acall(**inputs))
    return pipeline(**inputs)


def _settle(ends: Ends, mode: str, gate: threading.Event) -> None:
    """Threads cannot be cancelled: release them and wait until their stages have reported."""
    if mode != "sync call, thread stages":
        return
    gate.set()
    deadline = time.monotonic() + 5.0
    while ends.unended() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.parametrize("mode", MODES)
def test_fail_fast_foreach_ends_every_started_stage(mode: str) -> None:
    gate = threading.Event()
    stage = _stage(mode, lambda x: {"a": "fail"}.get(x, "slow"), gate, "y")
    each = ForEach(stage, over="xs", item="x", collect="ys", on_error="fail_fast")
    ends = Ends()
    try:
        with attach_hooks(ends), pytest.raises(stageflow.StageError, match="bad item a"):
            _call(mode, each, xs=["s1", "a", "s2"])
        if mode != "sync call, thread stages":
            assert ends.unended() == []  # reported before the call returned
            # the slow items that had started (the first always has) were cancelled
            assert "stage[0]" in ends.cancelled
            assert sorted(ends.cancelled) == sorted(p for p in ends.started if p != "stage[1]")
        _settle(ends, mode, gate)
    finally:
        gate.set()
    assert "stage[1]" in ends.started
    assert ends.unended() == []


@pytest.mark.parametrize("mode", MODES)
def test_quorum_ensemble_ends_every_started_member(mode: str) -> None:
    gate = threading.Event()
    members = [
        _stage(mode, lambda x, slow=slow: "slow" if slow else "Paris", gate, "answer")
        for slow in (False, True, False, True)
    ]
    ensemble = EnsemblePipeline(members, quorum=2)
    ends = Ends()
    try:
        with attach_hooks(ends):
            result = _call(mode, ensemble, x="q")
        assert result.answer == "Paris"
        if mode != "sync call, thread stages":
            assert ends.unended() == []
            assert "processors[1]" in ends.cancelled  # the slow members that had started
            slow = ("processors[1]", "processors[3]")
            assert sorted(ends.cancelled) == sorted(p for p in ends.started if p in slow)
        _settle(ends, mode, gate)
    finally:
        gate.set()
    assert {"processors[0]", "processors[1]", "processors[2]"} <= set(ends.started)
    assert ends.unended() == []
