"""Issue 9, RetryPolicy: a server's ``Retry-After`` is capped by ``max_delay`` and by the remaining
``max_elapsed`` budget (``retry-after: 86400`` used to sleep a day)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest
from dspy.utils.exceptions import LMRateLimitError

from stageflow import RetryPolicy, SequentialPipeline, Stage, StageError, stage
from stageflow.testing import call

DAY = 86400


class Waits:
    """A fake clock and sleeper: sleeping advances the clock, nothing really waits."""

    def __init__(self) -> None:
        self.now = 0.0
        self.delays: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def clock(self) -> float:
        return self.now


class ProviderHTTPError(Exception):
    """An HTTP client's error, as raised by a hand-written LM client: a status and response headers."""

    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code
        self.headers = headers


def failing_once(make: Callable[[], Exception]) -> tuple[Any, list[int]]:
    calls: list[int] = []
    lock = threading.Lock()

    def body(x: str) -> dict[str, str]:
        with lock:
            calls.append(1)
            first = len(calls) == 1
        if first:
            raise make()
        return {"y": "ok"}

    return stage(body, writes=["y"]), calls


def wrapped(inner: Exception) -> Exception:
    """``inner`` as the ``__cause__`` of a client wrapper, the way DSPy wraps engine errors."""
    try:
        raise inner
    except Exception as e:
        try:
            raise RuntimeError("LM call failed") from e
        except RuntimeError as outer:
            return outer


RETRY_AFTER_A_DAY: dict[str, Callable[[], Exception]] = {
    "dspy_attribute": lambda: LMRateLimitError("slow down", model="m", status=429, retry_after=DAY),
    "header_seconds": lambda: wrapped(ProviderHTTPError(429, {"Retry-After": str(DAY)})),
    "header_ms": lambda: wrapped(ProviderHTTPError(503, {"retry-after-ms": str(DAY * 1000)})),
    "header_http_date": lambda: wrapped(
        ProviderHTTPError(
            429, {"Retry-After": format_datetime(datetime.now(UTC) + timedelta(days=1), usegmt=True)}
        )
    ),
}


@pytest.mark.parametrize("kind", sorted(RETRY_AFTER_A_DAY))
async def test_a_day_long_retry_after_waits_at_most_max_delay(mode: str, kind: str) -> None:
    waits = Waits()
    body, calls = failing_once(RETRY_AFTER_A_DAY[kind])
    retry = RetryPolicy(max_delay=30.0, sleep=waits.sleep, asleep=waits.asleep, clock=waits.clock)
    result = await call(SequentialPipeline([Stage(body, retry=retry)]), mode, x="in")
    assert result.y == "ok"
    assert len(calls) == 2
    assert waits.delays == [30.0]
    [event] = result.run.events
    assert (event.kind, event.delay) == ("retry", 30.0)
    assert event.detail["retry_after"] == pytest.approx(DAY, abs=5)  # what the server asked for


async def test_the_default_policy_never_waits_longer_than_its_max_delay(mode: str) -> None:
    waits = Waits()
    body, _ = failing_once(RETRY_AFTER_A_DAY["dspy_attribute"])
    retry = RetryPolicy(sleep=waits.sleep, asleep=waits.asleep)
    await call(SequentialPipeline([Stage(body, retry=retry)]), mode, x="in")
    assert waits.delays == [RetryPolicy().max_delay]


async def test_a_retry_after_past_the_max_elapsed_budget_gives_up_at_once(mode: str) -> None:
    waits = Waits()
    body, calls = failing_once(RETRY_AFTER_A_DAY["header_seconds"])
    retry = RetryPolicy(
        max_delay=3600.0, max_elapsed=60.0, sleep=waits.sleep, asleep=waits.asleep, clock=waits.clock
    )
    with pytest.raises(StageError) as info:
        await call(SequentialPipeline([Stage(body, retry=retry)]), mode, x="in")
    assert waits.delays == []  # it never waits out a budget it cannot use
    assert len(calls) == 1
    assert isinstance(info.value.__cause__, RuntimeError)
    assert isinstance(info.value.__cause__.__cause__, ProviderHTTPError)
    assert [e.kind for e in info.value.events or []] == []


async def test_a_short_retry_after_is_honoured_exactly(mode: str) -> None:
    waits = Waits()
    body, _ = failing_once(lambda: wrapped(ProviderHTTPError(429, {"Retry-After": "2"})))
    retry = RetryPolicy(initial_delay=0.01, jitter=0.5, sleep=waits.sleep, asleep=waits.asleep)
    result = await call(SequentialPipeline([Stage(body, retry=retry)]), mode, x="in")
    assert result.y == "ok"
    assert waits.delays == [2.0]  # neither the backoff nor jitter


@pytest.mark.parametrize("value", ["-5", "nan", "soon", ""])
async def test_an_unreadable_retry_after_falls_back_to_the_backoff(mode: str, value: str) -> None:
    waits = Waits()
    body, _ = failing_once(lambda: wrapped(ProviderHTTPError(503, {"Retry-After": value})))
    retry = RetryPolicy(initial_delay=0.25, jitter=0, sleep=waits.sleep, asleep=waits.asleep)
    result = await call(SequentialPipeline([Stage(body, retry=retry)]), mode, x="in")
    assert result.y == "ok"
    assert waits.delays == [0.25]
