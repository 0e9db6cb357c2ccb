"""Budgets and rate limits under abuse: huge concurrency, models that misreport or fail mid-call,
calls bigger than the whole budget, blocks left while calls still run."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from typing import Any

import dspy
import pytest

import stageflow
from stageflow.budgets import LMBudget, rate_limit, rate_limits
from stageflow.testing import FakeLM


@pytest.fixture(autouse=True)
def _no_rate_limits_left() -> Any:
    yield
    for limiter in rate_limits().values():
        limiter.close()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self.lock:
            self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)


def test_huge_concurrency_never_overshoots() -> None:
    lm = FakeLM(latency=0.001, usage=(3, 2), max_tokens=2)
    qa = dspy.Predict("question -> answer")
    outcomes: list[str] = []
    lock = threading.Lock()

    def note(kind: str) -> None:
        with lock:
            outcomes.append(kind)

    def worker(i: int) -> None:
        try:
            qa(question=f"t{i}")
            note("ok")
        except stageflow.BudgetExceeded:
            note("refused")

    async def one(i: int) -> None:
        try:
            await qa.acall(question=f"a{i}")
            note("ok")
        except stageflow.BudgetExceeded:
            note("refused")

    async def many() -> None:
        await asyncio.gather(*(one(i) for i in range(512)))

    with dspy.context(lm=lm), stageflow.budget(max_calls=150) as spent:
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(worker, i)) for i in range(64)
        ]
        for t in threads:
            t.start()
        asyncio.run(many())
        for t in threads:
            t.join(60)
    assert spent.calls == lm.calls == 150
    assert (outcomes.count("ok"), outcomes.count("refused")) == (150, 576 - 150)
    assert (spent.reserved_calls, spent.reserved_tokens) == (0, 0)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_model_that_reports_no_usage_is_charged_its_reservation(mode: str) -> None:
    lm = FakeLM(usage=None, max_tokens=50)
    qa = dspy.Predict("question -> answer")
    pipe = stageflow.SequentialPipeline([qa])
    with dspy.context(lm=lm), stageflow.budget(max_tokens=2_000) as spent:
        done = 0

        def run_until_refused() -> None:
            nonlocal done
            for i in range(100):
                _ = pipe(question=f"q{i}") if mode == "sync" else asyncio.run(pipe.acall(question=f"q{i}"))
                done += 1

        with pytest.raises(stageflow.BudgetExceeded):
            run_until_refused()
    assert done == lm.calls > 0
    assert 0 < spent.tokens <= 2_000  # the token budget still ends, and is never passed
    assert spent.tokens == done * (spent.tokens // done)
    unreported = [e for e in spent.events if e.kind == "usage_unreported"]
    assert len(unreported) == 1  # said once per budget
    assert unreported[0].detail["model"] == lm.model


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_model_that_raises_mid_call_gives_its_tokens_back(mode: str) -> None:
    lm = FakeLM(latency=0.01, fail_times=3, usage=(10, 10), max_tokens=10)
    qa = dspy.Predict("question -> answer")

    def attempt(i: int) -> None:
        with pytest.raises(Exception) as info:
            _ = qa(question=f"q{i}") if mode == "sync" else asyncio.run(qa.acall(question=f"q{i}"))
        assert "scripted failure" in str(info.value)

    with dspy.context(lm=lm), stageflow.budget(max_calls=10, max_tokens=100_000) as spent:
        for i in range(3):
            attempt(i)
        assert (spent.calls, spent.tokens, spent.reserved_tokens, spent.reserved_calls) == (3, 0, 0, 0)
        qa(question="works")
    assert (spent.calls, spent.tokens) == (4, 20)


async def test_a_cancellation_raised_inside_the_model_counts_the_call_and_holds_nothing() -> None:
    lm = FakeLM(fail_with=lambda n: asyncio.CancelledError() if n == 1 else None)
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm), stageflow.budget(max_calls=1) as spent:
        with pytest.raises(asyncio.CancelledError):
            await qa.acall(question="q")
        # the request was out (the provider may run it): it used the only call, nothing stays held
        assert (spent.calls, spent.reserved_calls) == (1, 0)
        with pytest.raises(stageflow.BudgetExceeded):
            await qa.acall(question="again")
    assert lm.calls == 1


def test_a_call_bigger_than_the_whole_budget_is_refused_at_once_even_with_calls_in_flight() -> None:
    slow = FakeLM(latency=0.3, usage=(1, 1), max_tokens=1)
    big = FakeLM(model="fake/big", max_tokens=5_000)
    qa = dspy.Predict("question -> answer")
    with stageflow.budget(max_tokens=3_000) as spent:

        def in_flight() -> None:
            with dspy.context(lm=slow):
                qa(question="slow")

        t = threading.Thread(target=contextvars.copy_context().run, args=(in_flight,))
        t.start()
        while slow.active == 0:
            threading.Event().wait(0.001)
        with dspy.context(lm=big), pytest.raises(stageflow.BudgetExceeded) as info:
            qa(question="big")  # needs > 5,000 tokens: it can never fit, so it does not wait
        assert slow.active == 1  # refused while the slow call was still in flight
        t.join()
    assert info.value.needed > 5_000
    assert spent.tokens == 2


def test_calls_still_running_when_the_block_ends_settle_cleanly() -> None:
    lm = FakeLM(latency=0.05, usage=(1, 1), max_tokens=1)
    qa = dspy.Predict("question -> answer")
    threads = []
    with dspy.context(lm=lm), stageflow.budget(max_calls=10) as spent:
        for i in range(4):
            t = threading.Thread(
                target=contextvars.copy_context().run, args=(qa,), kwargs={"question": f"q{i}"}
            )
            threads.append(t)
            t.start()
    for t in threads:
        t.join()
    assert (spent.calls, spent.tokens) == (4, 8)
    assert (spent.reserved_calls, spent.reserved_tokens) == (0, 0)


def test_a_misbehaving_model_is_charged_what_it_reports() -> None:
    lm = FakeLM(usage=(10, 5_000), max_tokens=10)  # says it wrote 5,000 tokens when allowed 10
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm), stageflow.budget(max_tokens=4_000) as spent:
        qa(question="q")
        with pytest.raises(stageflow.BudgetExceeded):
            qa(question="again")
    assert spent.tokens == 5_010  # recorded as reported: never hidden, and nothing more is allowed


def test_a_zero_call_budget_still_serves_stage_cache_hits() -> None:
    lm = FakeLM()
    pipe = stageflow.SequentialPipeline([stageflow.Stage(dspy.Predict("question -> answer"), cache=True)])
    with dspy.context(lm=lm):
        pipe(question="warm")
        with stageflow.budget(max_calls=0) as spent:
            assert pipe(question="warm").answer == "ok"
            with pytest.raises(stageflow.BudgetExceeded):
                pipe(question="cold")
    assert (lm.calls, spent.calls) == (1, 0)


def test_an_inner_budget_bigger_than_the_outer_one_does_not_widen_it() -> None:
    lm = FakeLM()
    qa = dspy.Predict("question -> answer")
    with (
        dspy.context(lm=lm),
        stageflow.budget(max_calls=2) as outer,
        stageflow.budget(max_calls=100) as inner,
    ):
        qa(question="a")
        qa(question="b")
        with pytest.raises(stageflow.BudgetExceeded) as info:
            qa(question="c")
    assert info.value.scope == "stageflow.budget()"
    assert info.value.ledger is outer
    assert inner.calls == outer.calls == 2


def test_waiters_on_an_exhausted_budget_are_all_refused_not_stuck() -> None:
    lm = FakeLM(latency=0.02, usage=(1, 1), max_tokens=1)
    pipe = stageflow.ForEach(
        dspy.Predict("question -> answer"), over="questions", collect="answers", on_error="collect"
    )
    with dspy.context(lm=lm), stageflow.budget(max_calls=5):
        result = pipe(questions=[f"q{i}" for i in range(60)])
    assert lm.calls == 5
    assert sum(a is not None for a in result.answers) == 5
    assert len(result.run.extras["item_errors"]) == 55


def test_an_oversize_call_passes_a_rate_limit_once_the_window_is_empty() -> None:
    clock = Clock()
    lm = FakeLM(usage=(900, 100), max_tokens=100)
    limiter = rate_limit(lm.model, tpm=200, clock=clock, sleep=clock.sleep)
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        qa(question="a")
        qa(question="b")  # waits for the first to leave the window, then goes alone
    assert lm.calls == 2
    assert limiter.waits == 1
    assert clock.now >= 60


async def test_a_limiter_waiter_cancelled_takes_no_room() -> None:
    clock = Clock()
    lm = FakeLM()
    limiter = rate_limit(lm.model, rpm=1, clock=clock, asleep=lambda s: asyncio.sleep(3600))
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        await qa.acall(question="first")
        waiting = asyncio.create_task(qa.acall(question="second"))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    assert (limiter.requests, lm.calls) == (1, 1)


def test_a_budget_object_survives_deepcopy_of_a_program() -> None:
    import copy

    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")]).set_budget(
        LMBudget(max_calls=1)
    )
    clone = copy.deepcopy(pipe)
    assert clone.lm_budget == pipe.lm_budget
    with dspy.context(lm=FakeLM()):
        assert clone(question="q").answer == "ok"
