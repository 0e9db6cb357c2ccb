"""Per-model rate limits: every 60 s window stays within its limit (fake clock), Retry-After pauses
the model for every caller, cache hits take no room, and waiting shows in usage, events and profiles."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Iterator

import dspy
import pytest
from budget_kit import FakeClock
from dspy import lm15

import stageflow
from stageflow.budgets import rate_limit
from stageflow.testing import FakeLM, call


@pytest.fixture(autouse=True)
def _no_rate_limits_left() -> Iterator[None]:
    yield
    for limiter in stageflow.budgets.rate_limits().values():
        limiter.close()


MODEL = "stageflow-fake/lm"


def max_in_window(times: list[float], window: float = 60.0) -> int:
    """The most grants in any half-open window [t, t + window) that starts at a grant."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while j < len(times) and times[j] < t + window:
            j += 1
        best = max(best, j - i)
    return best


def test_every_window_holds_at_most_rpm_requests_threads_and_tasks() -> None:
    clock = FakeClock()
    lm = FakeLM(latency=0.001)
    qa = dspy.Predict("question -> answer")
    limiter = rate_limit(MODEL, rpm=10, clock=clock, sleep=clock.sleep, asleep=clock.asleep, record=True)

    def worker(i: int) -> None:
        for j in range(2):
            qa(question=f"t{i}-{j}")

    async def tasks() -> None:
        async def one(i: int) -> None:
            for j in range(2):
                await qa.acall(question=f"a{i}-{j}")

        await asyncio.gather(*(one(i) for i in range(64)))

    with dspy.context(lm=lm):
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(worker, i)) for i in range(32)
        ]
        for t in threads:
            t.start()
        asyncio.run(tasks())
        for t in threads:
            t.join(60)
    assert lm.calls == 192 == limiter.requests
    assert limiter.grants is not None
    assert len(limiter.grants) == 192
    assert max_in_window(limiter.grants) == 10  # reached, never exceeded
    assert max(limiter.grants) - min(limiter.grants) >= 60 * (192 // 10 - 1)
    assert limiter.waits > 0


async def test_async_calls_reach_the_model_in_windows_of_rpm() -> None:
    clock = FakeClock()
    seen: list[float] = []
    lm = FakeLM(fail_with=lambda n: seen.append(clock()))  # the model itself records when it is called
    qa = dspy.Predict("question -> answer")
    rate_limit(MODEL, rpm=7, clock=clock, asleep=clock.asleep)
    with dspy.context(lm=lm):
        await asyncio.gather(*(qa.acall(question=f"q{i}") for i in range(50)))
    assert len(seen) == 50
    assert max_in_window(seen) == 7


def test_tokens_per_minute_hold() -> None:
    clock = FakeClock()
    lm = FakeLM(usage=(40, 10), max_tokens=10)
    qa = dspy.Predict("question -> answer")
    limiter = rate_limit(MODEL, tpm=500, clock=clock, sleep=clock.sleep, record=True)
    with dspy.context(lm=lm):
        for i in range(30):
            qa(question=f"q{i}")
    assert limiter.tokens == 30 * 50
    assert limiter.grants is not None
    assert max_in_window(limiter.grants) * 50 <= 500
    assert limiter.waits > 0


async def test_retry_after_pauses_the_model_for_every_caller(mode: str) -> None:
    clock = FakeClock()

    def fail(n: int) -> Exception | None:
        return lm15.RateLimitError("slow down", retry_after=30) if n == 1 else None

    lm = FakeLM(fail_with=fail)
    limiter = rate_limit(MODEL, rpm=1000, clock=clock, sleep=clock.sleep, asleep=clock.asleep)
    first = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    other = stageflow.SequentialPipeline([dspy.Predict("topic -> summary")])
    with dspy.context(lm=lm):
        with pytest.raises(stageflow.StageError) as info:
            await call(first, mode, question="q")
        assert isinstance(info.value.__cause__, dspy.utils.exceptions.LMRateLimitError)
        start = clock()
        result = await call(other, mode, topic="t")  # another caller: it waits for the pause
    assert clock() - start >= 30
    assert limiter.pauses == 1
    assert limiter.waited == pytest.approx(30, abs=0.01)
    assert result.run.usage["stages[0]"].limit_wait == pytest.approx(30, abs=0.01)
    waits = [e for e in result.run.events if e.kind == "rate_limited"]
    assert [(e.stage, round(e.delay), e.detail["model"]) for e in waits] == [("stages[0]", 30, MODEL)]


async def test_a_retry_policy_and_the_limiter_agree_on_retry_after(mode: str) -> None:
    clock = FakeClock()
    lm = FakeLM(fail_with=lambda n: lm15.RateLimitError("429", retry_after=12) if n == 1 else None)
    rate_limit(MODEL, rpm=1000, clock=clock, sleep=clock.sleep, asleep=clock.asleep)
    retry = stageflow.RetryPolicy(max_attempts=2, sleep=clock.sleep, asleep=clock.asleep)
    pipe = stageflow.SequentialPipeline([stageflow.Stage(dspy.Predict("question -> answer"), retry=retry)])
    with dspy.context(lm=lm):
        result = await call(pipe, mode, question="q")
    assert result.answer == "ok"
    assert lm.calls == 2
    retry_event = next(e for e in result.run.events if e.kind == "retry")
    assert (
        retry_event.delay == 12
    )  # the policy slept the server's Retry-After, so the limiter had no wait left
    assert not [e for e in result.run.events if e.kind == "rate_limited"]


def test_cache_hits_take_no_room() -> None:
    clock = FakeClock()
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    lm = FakeLM(cache=True, model="stageflow-fake/rl-cached")
    limiter = rate_limit(lm.model, rpm=1, clock=clock, sleep=clock.sleep)
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        for _ in range(5):
            assert qa(question="same").answer == "ok"
    assert lm.calls == 1
    assert (limiter.requests, limiter.waits) == (1, 0)


def test_only_the_named_model_is_limited() -> None:
    clock = FakeClock()
    limited = FakeLM(model="fake/limited")
    free = FakeLM(model="fake/free")
    limiter = rate_limit("fake/limited", rpm=1, clock=clock, sleep=clock.sleep)
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=free):
        for i in range(5):
            qa(question=f"q{i}")
    with dspy.context(lm=limited):
        qa(question="a")
        qa(question="b")
    assert (limiter.requests, limiter.waits) == (2, 1)
    assert free.calls == 5


def test_the_profile_table_shows_the_wait_column_only_when_calls_waited() -> None:
    clock = FakeClock()
    lm = FakeLM()
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=lm), stageflow.profile() as quiet:
        pipe(question="q")
    assert "wait s" not in quiet.table()
    rate_limit(MODEL, rpm=1, clock=clock, sleep=clock.sleep)
    with dspy.context(lm=lm), stageflow.profile() as prof, stageflow.trace() as tracer:
        pipe(question="a")
        pipe(question="b")
    table = prof.table()
    assert "wait s" in table.splitlines()[0]
    assert "60.000" in table
    assert prof.get_performance_summary()["stages[0]"]["limit_wait"] == pytest.approx(60, abs=0.01)
    ends = [e for e in tracer.events if e["event"] == "stage_end"]
    assert [round(e["usage"]["limit_wait"]) for e in ends] == [0, 60]


def test_a_limiter_used_as_a_context_manager_is_lifted_on_exit() -> None:
    clock = FakeClock()
    lm = FakeLM()
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm):
        with rate_limit(MODEL, rpm=1, clock=clock, sleep=clock.sleep) as limiter:
            qa(question="a")
        qa(question="b")
        qa(question="c")
    assert limiter.requests == 1
    assert stageflow.budgets.rate_limits() == {}


def test_budgets_and_rate_limits_work_together() -> None:
    clock = FakeClock()
    lm = FakeLM(usage=(5, 5), max_tokens=5)
    limiter = rate_limit(MODEL, rpm=2, clock=clock, sleep=clock.sleep)
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm), stageflow.budget(max_calls=3, clock=clock) as spent:
        for i in range(3):
            qa(question=f"q{i}")
        with pytest.raises(stageflow.BudgetExceeded):
            qa(question="refused")  # refused by the budget: takes no room in the limiter
    assert spent.calls == 3 == limiter.requests
    assert limiter.waits == 1
