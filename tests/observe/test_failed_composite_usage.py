"""A nested pipeline or fan-out that failed still reports what its stages used before it failed:
its row in a profile, the profile's totals and its trace event carry it (before, its row and the
totals counted none of it: 0 LM calls for a ForEach whose items had made 3)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from typing import Any

import dspy
import pytest

import stageflow
from stageflow.testing import FakeLM, call


class Item(dspy.Module):  # type: ignore[misc]
    """Answers its sub-question (one LM call), then fails for ``"bad"``; with ``hold``, the others
    wait for it to be set before they return."""

    def __init__(self, hold: threading.Event | None = None) -> None:
        super().__init__()
        self.p = dspy.Predict("sub_question -> fact")
        self.hold = hold

    def forward(self, sub_question: str) -> Any:
        fact = self.p(sub_question=sub_question).fact
        if sub_question == "bad":
            raise ValueError("bad item")
        if self.hold is not None:
            self.hold.wait(5)
        return dspy.Prediction(fact=fact)


def _program(nested: bool) -> Any:
    fan_out = stageflow.ForEach(Item(), over="sub_questions", collect="facts", max_concurrency=1)
    inner = stageflow.SequentialPipeline([fan_out]) if nested else fan_out
    return stageflow.SequentialPipeline([dspy.Predict("question -> sub_questions: list[str]"), inner])


@pytest.mark.parametrize("nested", [False, True], ids=["fan-out", "pipeline-around-fan-out"])
async def test_a_failed_nested_stage_reports_its_stages_usage(mode: str, nested: bool) -> None:
    lm = FakeLM({"sub_questions": ["a", "b", "bad"], "fact": "F"})
    with (
        dspy.context(lm=lm),
        stageflow.profile() as prof,
        stageflow.trace() as tracer,
        pytest.raises(stageflow.StageError, match="bad item"),
    ):
        await call(_program(nested), mode, question="q")
    assert lm.calls == 4
    rows = {path: row["lm_calls"] for path, row in prof.get_performance_summary().items()}
    assert rows["stages[0]"] == 1
    assert rows["stages[1]"] == 3  # the three items' calls, the failed one's included
    assert prof.to_dict()["totals"]["lm_calls"] == 4
    last = prof.last_run
    assert last is not None
    assert last.usage.lm_calls == 4
    failed = [e for e in tracer.events if e.get("event") == "stage_error" and e.get("stage") == "stages[1]"]
    assert len(failed) == 1
    assert failed[0]["usage"]["lm_calls"] == 3


def _checked(sub_question: str, fact: str) -> dict[str, str]:
    if sub_question == "q2":
        time.sleep(0.2)  # (the other items are done by then: none is stopped mid-way)
        raise ValueError("item q2 fails")
    return {"checked": fact}


@pytest.mark.parametrize("nested", [False, True], ids=["fan-out", "pipeline-around-fan-out"])
async def test_a_fail_fast_fan_out_keeps_its_branches_usage(mode: str, nested: bool) -> None:
    """(helper 107) A fail-fast ``ForEach`` of sub-pipelines, items side by side: the failure left the
    fan-out before the branches' runs joined its run, so its row, its parents' and the totals
    counted none of their LM calls (0 of 4; the run's total 1 of 5)."""
    item = stageflow.SequentialPipeline(
        [dspy.Predict("sub_question -> fact"), stageflow.stage(_checked, writes=["checked"])]
    )
    each = stageflow.ForEach(item, over="sub_questions", collect={"checked": "facts"})
    program = stageflow.SequentialPipeline(
        [
            dspy.Predict("question -> sub_questions: list[str]"),
            stageflow.SequentialPipeline([each]) if nested else each,
        ]
    )
    lm = FakeLM({"sub_questions": ["q0", "q1", "q2", "q3"], "fact": "F"}, usage=(100, 10))
    with dspy.context(lm=lm), stageflow.profile() as prof, pytest.raises(stageflow.StageError) as caught:
        await call(program, mode, question="Q")
    assert lm.calls == 5
    rows = {path: row["lm_calls"] for path, row in prof.get_performance_summary().items()}
    assert rows["stages[1]"] == 4
    if nested:
        assert rows["stages[1].stages[0]"] == 4
    last = prof.last_run
    assert last is not None
    assert (last.usage.lm_calls, last.usage.input_tokens) == (5, 500)
    assert caught.value.run.usage.total.lm_calls == 5  # what the error carries out says so too


async def _slow_or_failing(sub_question: str, fact: str) -> dict[str, str]:
    if sub_question == "q2":
        await asyncio.sleep(0.2)  # (every LM call has been answered by then)
        raise ValueError("item q2 fails")
    if sub_question == "q3":
        await asyncio.sleep(5)  # (stopped by q2's failure, after its LM call was answered)
    return {"checked": fact}


@pytest.mark.parametrize("observed", [False, True], ids=["unobserved", "profiled"])
async def test_a_sub_pipeline_stopped_mid_way_keeps_the_lm_calls_it_made(observed: bool) -> None:
    """An item that is a pipeline, stopped by the fan-out after its LM call was answered: its call
    counted nowhere above it (its row, the fan-out's, the totals, the error's run)."""
    item = stageflow.SequentialPipeline(
        [dspy.Predict("sub_question -> fact"), stageflow.stage(_slow_or_failing, writes=["checked"])]
    )
    each = stageflow.ForEach(item, over="sub_questions", collect={"checked": "facts"})
    program = stageflow.SequentialPipeline([dspy.Predict("question -> sub_questions: list[str]"), each])
    lm = FakeLM({"sub_questions": ["q0", "q1", "q2", "q3"], "fact": "F"}, usage=(100, 10))
    with (
        dspy.context(lm=lm),
        stageflow.profile() if observed else contextlib.nullcontext() as prof,
        pytest.raises(stageflow.StageError, match="item q2 fails") as caught,
    ):
        await program.acall(question="Q")
    assert lm.calls == 5
    assert caught.value.run.usage.total.lm_calls == 5
    if observed:
        rows = prof.get_performance_summary()
        assert rows["stages[1]"]["lm_calls"] == 4
        assert (rows["stages[1].stage[3]"]["lm_calls"], rows["stages[1].stage[3]"]["cancelled"]) == (1, 1)
        assert prof.last_run.usage.lm_calls == 5


async def _slow(fact: str) -> dict[str, str]:
    await asyncio.sleep(5)
    return {"done": fact}


async def test_a_sub_pipeline_past_its_timeout_keeps_the_lm_calls_it_made() -> None:
    """``Stage(pipeline, timeout=...)`` under ``acall``: the timeout cancelled the nested call after
    its LM call was answered; the call counted nowhere above it (its row 0, the totals 1 of 2)."""
    inner = stageflow.SequentialPipeline(
        [dspy.Predict("question -> fact"), stageflow.stage(_slow, writes=["done"])]
    )
    program = stageflow.SequentialPipeline(
        [dspy.Predict("q0 -> question"), stageflow.Stage(inner, timeout=0.3)]
    )
    lm = FakeLM({"question": "Q", "fact": "F"}, usage=(100, 10))
    with (
        dspy.context(lm=lm),
        stageflow.profile() as prof,
        pytest.raises(stageflow.StageTimeoutError) as caught,
    ):
        await program.acall(q0="x")
    assert lm.calls == 2
    assert caught.value.run.usage.total.lm_calls == 2
    rows = prof.get_performance_summary()
    assert rows["stages[1]"]["lm_calls"] == 1
    assert prof.last_run.usage.lm_calls == 2


def _flaky(calls: list[int]) -> Any:
    def check(fact: str) -> dict[str, str]:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("flaky")
        return {"done": fact}

    return check


@pytest.mark.parametrize("recover", ["retry", "fallback", "give_up"])
async def test_a_sub_pipelines_failed_attempts_keep_their_lm_calls(mode: str, recover: str) -> None:
    """A nested pipeline retried (or replaced by a fallback) after its LM call was answered: that
    call counted nowhere (1 of 2 calls, while DSPy's own tracker said 2)."""
    inner = stageflow.SequentialPipeline(
        [dspy.Predict("question -> fact"), stageflow.stage(_flaky([]), writes=["done"])]
    )
    options: dict[str, Any] = {
        "retry": {"retry": stageflow.RetryPolicy(max_attempts=2, backoff=0)},
        "fallback": {"fallback": {"fact": "fallback", "done": "fallback"}},
        "give_up": {"retry": stageflow.RetryPolicy(max_attempts=1, backoff=0)},
    }[recover]
    program = stageflow.SequentialPipeline([stageflow.Stage(inner, **options)])
    lm = FakeLM({"fact": "F"}, usage=(100, 10))
    with dspy.context(lm=lm), dspy.track_usage() as tracker, stageflow.profile() as prof:
        if recover == "give_up":
            with pytest.raises(stageflow.StageError) as caught:
                await call(program, mode, question="q")
            total = caught.value.run.usage.total
        else:
            total = (await call(program, mode, question="q")).run.usage.total
    real = lm.calls
    assert real == (2 if recover == "retry" else 1)
    assert total.lm_calls == real
    assert total.input_tokens == tracker.get_total_tokens()[lm.model]["prompt_tokens"] == 100 * real
    assert prof.get_performance_summary()["stages[0]"]["lm_calls"] == real


def test_the_profiles_totals_count_an_item_recorded_after_its_run_ended() -> None:
    """(helper 108, r3) A sync fail-fast fan-out's item left running records its LM call after the run
    ended: the run's usage (``last_run``) took it, the profile's totals did not (1 of 3, for good)."""
    release = threading.Event()  # (the other items are still running when the failure ends the call)
    program = stageflow.ForEach(Item(release), over="sub_questions", collect="facts", max_concurrency=3)
    lm = FakeLM({"fact": "F"}, usage=(100, 10), rendezvous=3, rendezvous_timeout=2)
    with dspy.context(lm=lm), stageflow.profile() as prof:
        with pytest.raises(stageflow.StageError, match="bad item"):
            program(sub_questions=["a", "bad", "c"])
        release.set()
        deadline = time.monotonic() + 5
        while prof.to_dict()["totals"]["lm_calls"] < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert lm.calls == 3
    assert prof.last_run is not None
    assert prof.last_run.usage.lm_calls == 3
    assert prof.to_dict()["totals"]["lm_calls"] == 3
