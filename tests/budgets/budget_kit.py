"""Shared helpers of the budget and rate-limit tests: a fake clock, and a storm of concurrent calls.

Test modules import what they use (``from budget_kit import FakeClock``); a ``conftest.py`` here
would clash with ``tests/conftest.py`` when ``--doctest-modules`` collects both.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from typing import Any

import stageflow


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


THREADS, TASKS, CALLS_EACH = 32, 64, 3


def storm(pipe: Any, on_result: Callable[[str], None]) -> None:
    """32 threads and 64 asyncio tasks, each running the pipeline CALLS_EACH times, all at once."""
    start = threading.Barrier(THREADS + 1, timeout=30)

    def record(fn: Callable[[], Any]) -> None:
        try:
            fn()
            on_result("ok")
        except stageflow.BudgetExceeded:
            on_result("refused")

    def worker(i: int) -> None:
        start.wait()
        for j in range(CALLS_EACH):
            record(lambda j=j: pipe(question=f"t{i}-{j}"))

    async def task(i: int) -> None:
        for j in range(CALLS_EACH):
            try:
                await pipe.acall(question=f"a{i}-{j}")
                on_result("ok")
            except stageflow.BudgetExceeded:
                on_result("refused")

    async def tasks() -> None:
        start.wait()
        await asyncio.gather(*(task(i) for i in range(TASKS)))

    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(worker, i)) for i in range(THREADS)
    ]
    for t in threads:
        t.start()
    asyncio.run(tasks())
    for t in threads:
        t.join(60)


def tally() -> tuple[dict[str, int], Callable[[str], None]]:
    counts = {"ok": 0, "refused": 0}
    lock = threading.Lock()

    def on_result(kind: str) -> None:
        with lock:
            counts[kind] += 1

    return counts, on_result
