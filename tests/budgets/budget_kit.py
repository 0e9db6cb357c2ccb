"""Shared helpers of the budget and rate-limit tests: a fake clock.

Test modules import what they use (``from budget_kit import FakeClock``); a ``conftest.py`` here
would clash with ``tests/conftest.py`` when ``--doctest-modules`` collects both.
"""

from __future__ import annotations

import asyncio
import threading


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
