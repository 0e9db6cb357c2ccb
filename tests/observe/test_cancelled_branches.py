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


@pytest.mark.parametrize("mode", MODES)
def test_a_profile_and_a_trace_count_stopped_branches_as_cancelled_not_as_errors(mode: str) -> None:
    """A fail-fast fan-out's other branches — cancelled tasks, or sync branches left running whose
    LM call is refused — are ``cancelled`` in a profile, a trace and its report; ``errors`` counts
    the stage's own failures. Before, each of them counted as an error of its stage."""
    from stageflow.observe.report.spans import build_spans, walk

    gate = threading.Event()
    stage = _stage(mode, lambda x: {"a": "fail"}.get(x, "slow"), gate, "y")
    each = ForEach(stage, over="xs", item="x", collect="ys", on_error="fail_fast")
    ends = Ends()
    try:
        with attach_hooks(ends), stageflow.profile() as prof, stageflow.trace() as tracer:
            with pytest.raises(stageflow.StageError, match="bad item a"):
                _call(mode, each, xs=["s1", "a", "s2"])
            if mode == "sync call, thread stages":
                _settle(ends, mode, gate)  # (its leftovers end when their threads do: as errors before)
    finally:
        gate.set()
    summary = prof.get_performance_summary()
    stopped = [p for p in summary if p != "stage[1]"]
    assert summary["stage[1]"]["errors"] == 1
    assert summary["stage[1]"]["cancelled"] == 0
    if mode != "sync call, thread stages":  # (threads are not stopped: they finish their own work)
        assert stopped
        assert all(summary[p]["cancelled"] == 1 and summary[p]["errors"] == 0 for p in stopped)
        assert "cancelled" in prof.table()
    errors = [e for e in tracer.events if e["event"] == "stage_error"]
    assert [e["stage"] for e in errors if not e.get("cancelled")] == ["stage[1]"]
    assert sorted(e["stage"] for e in errors if e.get("cancelled")) == sorted(ends.cancelled)
    roots, _ = build_spans(tracer.events)
    statuses = {s.path: s.status for s in walk(roots) if s.kind == "stage"}
    assert statuses["stage[1]"] == "error"
    assert sorted(p for p, st in statuses.items() if st == "cancelled") == sorted(ends.cancelled)


def test_a_leftover_branchs_refused_lm_call_is_cancelled_in_the_profile() -> None:
    import dspy

    from stageflow.testing import FakeLM

    lm = FakeLM({"y": "ok"}, model="fake/profile-leftover")
    pred = dspy.Predict("x -> y")

    @stageflow.stage(writes=["y"])
    def work(x: str) -> dict[str, Any]:
        if x == "boom":
            time.sleep(0.05)
            raise ValueError("boom")
        time.sleep(0.2)  # (the fan-out ends meanwhile: the call below is refused)
        return {"y": pred(x=x).y}

    with dspy.context(lm=lm), stageflow.profile() as prof:
        with pytest.raises(stageflow.StageError, match="boom"):
            ForEach(work, over="xs", item="x", collect={"y": "ys"})(xs=["boom", "a"])
        time.sleep(0.4)
    summary = prof.get_performance_summary()
    assert (summary["stage[0]"]["errors"], summary["stage[0]"]["cancelled"]) == (1, 0)
    assert (summary["stage[1]"]["errors"], summary["stage[1]"]["cancelled"]) == (0, 1)
    assert lm.calls == 0
    assert "cancelled" in prof.table()
    with stageflow.profile() as clean:
        ForEach(stageflow.stage(lambda x: {"y": x}, writes=["y"]), over="xs", item="x", collect="ys")(
            xs=["a"]
        )
    assert "cancelled" not in clean.table()  # (the column shows only when some call was)


def test_a_cancelled_stage_keeps_the_lm_calls_it_made_in_the_profile() -> None:
    """(helper 101, A) A stage timed out after some of its LM calls were answered and billed: the
    profile dropped them (``lm_calls`` 0) while the run's usage, DSPy's tracker and the budget had
    them."""
    import dspy

    from stageflow.testing import FakeLM

    lm = FakeLM({"fact": "F", "summary": "S"}, latency=0.1, model="fake/cancelled-usage")

    class ThreeCalls(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.p = dspy.Predict("q -> fact")

        def forward(self, q: str) -> dspy.Prediction:
            return dspy.Prediction(fact="".join(self.p(q=q + s).fact for s in ("", "!", "?")))

    program = stageflow.ParallelPipeline(
        [[stageflow.Stage(ThreeCalls(), writes=["fact"]), stageflow.Stage(dspy.Predict("q -> summary"))]],
        timeout=0.15,
    )
    with dspy.context(lm=lm), stageflow.profile() as prof:
        result = program(q="a")
        time.sleep(0.5)  # (the timed-out stage's thread ends meanwhile: its third call is refused)
    summary = prof.get_performance_summary()
    assert summary["stages[0]"]["cancelled"] == 1
    assert summary["stages[0]"]["lm_calls"] == result.run.usage["stages[0]"].lm_calls == 2
    assert sum(row["input_tokens"] for row in summary.values()) == result.run.usage.total.input_tokens
