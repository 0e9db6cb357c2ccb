"""Concurrent LM calls against one budget never overshoot it (counts, not times)."""

from __future__ import annotations

import asyncio

import dspy
import pytest
from budget_kit import CALLS_EACH, TASKS, THREADS, FakeClock, storm, tally

import stageflow
from stageflow.budgets import LMBudget
from stageflow.testing import FakeLM


@pytest.mark.parametrize("max_calls", [1, 40, 150])
def test_no_overshoot_on_calls_with_threads_and_tasks(max_calls: int) -> None:
    clock = FakeClock()
    lm = FakeLM(latency=0.002, usage=(20, 5), max_tokens=5)
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    counts, on_result = tally()
    with dspy.context(lm=lm), stageflow.budget(max_calls=max_calls, clock=clock) as spent:
        storm(pipe, on_result)
    total = (THREADS + TASKS) * CALLS_EACH
    assert spent.calls == lm.calls == max_calls  # every allowed call was made, not one more
    assert counts == {"ok": max_calls, "refused": total - max_calls}
    assert spent.refused == total - max_calls
    assert (spent.reserved_calls, spent.reserved_tokens) == (0, 0)
    assert lm.peak_active > 1 or max_calls == 1  # calls did overlap


@pytest.mark.parametrize("enforced", [True, False], ids=["max_tokens-enforced", "careful-first-call"])
def test_no_overshoot_on_tokens_with_threads_and_tasks(enforced: bool) -> None:
    # enforced: max_tokens is a true bound, so calls run at full concurrency from the first; not
    # enforced: the first call goes alone, and calibrates the rest (the model stays within it here)
    clock = FakeClock()
    lm = FakeLM(latency=0.002, usage=(40, 8), max_tokens=8, enforce_max_tokens=enforced)
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    counts, on_result = tally()
    limit = 6_000
    with dspy.context(lm=lm), stageflow.budget(max_tokens=limit, clock=clock) as spent:
        storm(pipe, on_result)
    assert spent.tokens <= limit
    assert spent.tokens == lm.reported_tokens == 48 * lm.calls
    assert counts["ok"] == lm.calls
    # it stopped because the next reservation (prompt bytes + max_tokens) no longer fit, not earlier
    reservation = max(spent.tokens // lm.calls, 1)
    assert spent.tokens > limit - 20 * reservation
    assert (spent.reserved_calls, spent.reserved_tokens) == (0, 0)
    assert lm.peak_active > 1


def test_a_call_waits_for_calls_in_flight_instead_of_failing() -> None:
    clock = FakeClock()
    # each call reserves ~600 tokens and uses 12: four calls in flight fill a 2,500 budget, yet all
    # 40 calls fit in it once settled, so none may be refused
    lm = FakeLM(latency=0.005, usage=(10, 2), max_tokens=2)
    pipe = stageflow.ForEach(dspy.Predict("question -> answer"), over="questions", collect="answers")
    with dspy.context(lm=lm), stageflow.budget(max_tokens=2_500, clock=clock) as spent:
        result = pipe(questions=[f"q{i}" for i in range(40)])
    assert len(result.answers) == 40
    assert spent.tokens == 40 * 12
    assert spent.refused == 0
    assert lm.peak_active <= 4


async def test_cancelled_tasks_give_their_reservations_back_and_sent_requests_count() -> None:
    clock = FakeClock()
    # a model that stops at max_tokens: its calls are bounded, so three may be in flight at once
    lm = FakeLM(latency=5.0, usage=(1, 1), max_tokens=1, enforce_max_tokens=True)
    qa = dspy.Predict("question -> answer")
    with (
        dspy.context(lm=lm),
        stageflow.budget(LMBudget(max_calls=3, max_tokens=100_000, clock=clock)) as spent,
    ):
        tasks = [asyncio.create_task(qa.acall(question=f"q{i}")) for i in range(10)]
        while lm.active < 3:  # three calls in flight, seven waiting for room
            await asyncio.sleep(0.005)
        assert spent.reserved_calls == 3
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results)
    # nothing stays reserved; the three requests that were out count (the provider may run them),
    # the seven that were waiting for room do not
    assert (spent.reserved_calls, spent.reserved_tokens, spent.calls) == (0, 0, 3)


async def test_a_pipeline_cancelled_by_a_timeout_holds_nothing_and_counts_its_sent_call() -> None:
    clock = FakeClock()
    lm = FakeLM(latency=5.0)
    pipe = stageflow.SequentialPipeline(
        [stageflow.Stage(dspy.Predict("question -> answer"), timeout=0.05)]
    ).set_budget(max_calls=1, clock=clock)
    with (
        dspy.context(lm=lm),
        stageflow.budget(max_calls=5) as outer,
        pytest.raises(stageflow.StageTimeoutError),
    ):
        await pipe.acall(question="q")
    assert (outer.reserved_calls, outer.reserved_tokens, outer.calls) == (0, 0, 1)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_budgets_compose_with_the_concurrency_cap(mode: str) -> None:
    # at most 2 calls at once (limits) and a token budget that fits only 2 reservations in flight:
    # leaves wait for both, nothing deadlocks, the run completes within the budget
    lm = FakeLM(latency=0.003, usage=(10, 2), max_tokens=2, rendezvous=2, rendezvous_timeout=0.05)
    each = stageflow.ForEach(dspy.Predict("question -> answer"), over="questions", collect="answers")
    questions = [f"q{i}" for i in range(24)]
    with dspy.context(lm=lm), stageflow.limits(2), stageflow.budget(max_tokens=1_300) as spent:
        result = each(questions=questions) if mode == "sync" else asyncio.run(each.acall(questions=questions))
    assert result.answers == ["ok"] * 24
    assert lm.peak_active <= 2
    assert spent.tokens == 24 * 12
    assert spent.refused == 0
