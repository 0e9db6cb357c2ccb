"""Shared helpers of the budget and rate-limit tests: a fake clock, and no limiter left behind."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest

from stageflow.budgets import rate_limits


class FakeClock:
    """A clock that only moves when someone sleeps on it (thread-safe): waits cost no real time."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.slept = 0.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds
            self.slept += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _no_rate_limits_left() -> Iterator[None]:
    yield
    for limiter in rate_limits().values():
        limiter.close()
