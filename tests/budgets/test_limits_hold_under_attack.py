"""Limits that an adversarial check got past: a cancelled call still counts, a Retry-After cannot
pause a model for a day (or crash it), and tokens-per-minute learn what answers cost."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import threading
from collections.abc import Iterator

import dspy
import pytest
from budget_kit import FakeClock
from dspy import lm15

import stageflow
from stageflow.budgets import rate_limit
from stageflow.testing import FakeLM

MODEL = "stageflow-fake/lm"


@pytest.fixture(autouse=True)
def _no_rate_limits_left() -> Iterator[None]:
    yield
    for limiter in stageflow.budgets.rate_limits().values():
        limiter.close()


class CountingLM(FakeLM):
    """Counts the requests that reached the engine (what a provider would bill)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.sent = 0

    def _enter(self) -> None:
        self.sent += 1
        super()._enter()


def _timing_out_pipeline() -> stageflow.SequentialPipeline:
    retry = stageflow.RetryPolicy(max_attempts=12, jitter=0, initial_delay=0.01, retry_on=lambda e: True)
    return stageflow.SequentialPipeline(
        [stageflow.Stage(dspy.Predict("question -> answer"), timeout=0.05, retry=retry)]
    )


async def test_a_call_cancelled_by_a_timeout_counts_so_retries_stop_at_max_calls() -> None:
    lm = CountingLM(latency=0.3, max_tokens=50, enforce_max_tokens=True)
    with dspy.context(lm=lm), stageflow.budget(max_calls=3) as spent, pytest.raises(stageflow.BudgetExceeded):
        await _timing_out_pipeline().acall(question="x")
    assert spent.calls == 3
    assert lm.sent == 3  # (it was 12: each cancelled request gave its call back)
    assert spent.input_tokens > 0  # the prompts of requests that may still run at the provider


def test_a_keyboard_interrupt_inside_a_call_still_counts_the_call() -> None:
    def interrupt(n: int) -> BaseException | None:
        return KeyboardInterrupt() if n == 1 else None

    lm = FakeLM(fail_with=interrupt)
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm), stageflow.budget(max_calls=2) as spent:
        with pytest.raises(KeyboardInterrupt):
            qa(question="a")
        qa(question="b")
        with pytest.raises(stageflow.BudgetExceeded):
            qa(question="c")
    assert spent.calls == 2


@pytest.mark.parametrize("asked", [86_400.0, 1e12, math.inf])
def test_a_huge_retry_after_pauses_the_model_for_max_pause_and_says_so(
    asked: float, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    lm = FakeLM(fail_with=lambda n: lm15.RateLimitError("slow down", retry_after=asked) if n == 1 else None)
    limiter = rate_limit(MODEL, rpm=1000, clock=clock, sleep=clock.sleep, max_pause=60)
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm), caplog.at_level(logging.WARNING, logger="stageflow"):
        with pytest.raises(Exception, match="slow down"):
            qa(question="a")
        start = clock()
        assert qa(question="b").answer == "ok"  # no OverflowError, no day-long sleep
    assert clock() - start == pytest.approx(60, abs=0.01)
    assert limiter.pauses == 1
    assert "pausing the model's calls for max_pause=60" in caplog.text


@pytest.mark.parametrize("asked", [-5.0, math.nan, 0.0])
def test_a_retry_after_that_is_no_wait_is_ignored_and_logged(
    asked: float, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    limiter = rate_limit(MODEL, rpm=1000, clock=clock, sleep=clock.sleep)
    with caplog.at_level(logging.WARNING, logger="stageflow"):
        limiter.pause(asked)
    assert limiter.pauses == 0
    assert limiter.delay(1, 0) == 0
    assert "ignored a Retry-After" in caplog.text


def test_max_pause_is_checked() -> None:
    with pytest.raises(stageflow.ConfigurationError, match="max_pause"):
        rate_limit(MODEL, rpm=1, max_pause=-1)


def test_tokens_per_minute_learn_what_answers_cost_beyond_the_estimate() -> None:
    """No max_tokens: the estimate has no room for the answer. After the first answer the limiter adds
    what it cost, so 16 threads at once can no longer put 8 times tpm into every window."""
    clock = FakeClock()
    lm = FakeLM(usage=(10, 5000))  # 5,010 tokens a call, none of it in the estimate
    qa = dspy.Predict("question -> answer")
    limiter = rate_limit(MODEL, tpm=10_000, clock=clock, sleep=clock.sleep, record=True)
    with dspy.context(lm=lm):
        qa(question="first")  # one answer seen

        def worker(i: int) -> None:
            for j in range(2):
                qa(question=f"t{i}-{j}")

        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(worker, i)) for i in range(16)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert lm.calls == 33 == limiter.requests
    assert limiter.excess > 4000  # (the estimate counted the prompt: ~140 tokens)
    assert limiter.grants is not None
    times = sorted(limiter.grants)
    most = max(sum(1 for u in times if t <= u < t + 60) for t in times)
    assert most * 5010 <= 10_000


async def test_an_async_storm_learns_too() -> None:
    clock = FakeClock()
    lm = FakeLM(usage=(10, 5000))
    qa = dspy.Predict("question -> answer")
    limiter = rate_limit(MODEL, tpm=10_000, clock=clock, asleep=clock.asleep, record=True)
    with dspy.context(lm=lm):
        await qa.acall(question="first")
        await asyncio.gather(*(qa.acall(question=f"q{i}") for i in range(12)))
    assert limiter.grants is not None
    times = sorted(limiter.grants)
    assert max(sum(1 for u in times if t <= u < t + 60) for t in times) * 5010 <= 10_000


def test_a_limit_set_without_the_provider_prefix_is_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lm = FakeLM(model="openai/gpt-4o-mini-test")
    limiter = rate_limit("gpt-4o-mini-test", rpm=1)
    with dspy.context(lm=lm), caplog.at_level(logging.WARNING, logger="stageflow"):
        dspy.Predict("question -> answer")(question="a")
        dspy.Predict("question -> answer")(question="b")
    assert limiter.requests == 0  # exact match only, as documented
    warnings = [r for r in caplog.records if "does not hold calls to the model" in r.getMessage()]
    assert len(warnings) == 1
    assert "'openai/gpt-4o-mini-test'" in warnings[0].getMessage()


def test_a_cost_budget_says_once_when_the_model_reports_no_cost(caplog: pytest.LogCaptureFixture) -> None:
    lm = FakeLM(model="stageflow-fake/unpriced-once")  # reports no cost, has no known price
    p = stageflow.SequentialPipeline([dspy.Predict("question -> answer"), dspy.Predict("answer -> summary")])
    with (
        dspy.context(lm=lm),
        caplog.at_level(logging.WARNING, logger="stageflow"),
        stageflow.budget(max_cost=0.01) as spent,
    ):
        p(question="a")
        p(question="b")
    notes = [e for e in spent.events if e.kind == "cost_unreported"]
    assert len(notes) == 1
    assert notes[0].detail["model"] == "stageflow-fake/unpriced-once"
    assert sum("reported no cost" in r.getMessage() for r in caplog.records) == 1
    per_call = stageflow.SequentialPipeline([dspy.Predict("question -> answer")]).set_budget(max_cost=0.01)
    with dspy.context(lm=lm), caplog.at_level(logging.WARNING, logger="stageflow"):
        results = [per_call(question=f"q{i}") for i in range(3)]
    assert all(any(e.kind == "cost_unreported" for e in r.run.events) for r in results)  # each budget says it
    assert sum("reported no cost" in r.getMessage() for r in caplog.records) == 1  # the log, once per model


def test_a_model_that_reports_its_cost_raises_no_note() -> None:
    lm = FakeLM(cost=0.001)
    with dspy.context(lm=lm), stageflow.budget(max_cost=1.0) as spent:
        dspy.Predict("question -> answer")(question="a")
    assert not [e for e in spent.events if e.kind == "cost_unreported"]


def test_one_huge_answer_throttles_a_few_calls_not_the_next_thirty_two() -> None:
    clock = FakeClock()
    sizes = iter([20_000] + [50] * 60)
    lm = FakeLM(usage=lambda inputs: (0, next(sizes)), max_tokens=100)
    qa = dspy.Predict("question -> answer")
    limiter = rate_limit(MODEL, tpm=2000, clock=clock, sleep=clock.sleep, record=True)
    start = clock()
    with dspy.context(lm=lm):
        for i in range(40):
            qa(question=f"q{i}")
    assert limiter.excess <= 2000  # never more than a whole window
    assert clock() - start < 60 * 12  # (one call per minute for 32 calls before)


def test_max_pause_must_be_finite() -> None:
    with pytest.raises(stageflow.ConfigurationError, match="finite"):
        rate_limit(MODEL, rpm=1, max_pause=math.inf)
