"""Tiny side-by-side timing harness: every variant runs in each repetition, in rotated order.

Reported numbers are medians over repetitions of per-operation wall time (``perf_counter``) and
process CPU time; ratios are taken within one run, so they carry over between machines.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

__all__ = [
    "calibrate",
    "dspy_untouched",
    "machine_note",
    "measure",
    "rotated_runs",
    "run_async",
    "run_awaited",
    "settle",
]


def calibrate(fn: Callable[[], Any], target_s: float = 0.05) -> int:
    """How many calls of ``fn`` take about ``target_s``."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = time.perf_counter() - t0
        if dt >= target_s / 4 or n >= 1 << 20:
            return max(1, int(n * target_s / max(dt, 1e-9)))
        n *= 4


def measure(variants: dict[str, Callable[[], Any]], reps: int = 21) -> dict[str, dict[str, float]]:
    """Median µs per call (wall and CPU) for each variant, rotated order per repetition."""
    loops = {name: calibrate(fn) for name, fn in variants.items()}
    wall: dict[str, list[float]] = {n: [] for n in variants}
    cpu: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, n = variants[name], loops[name]
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                fn()
            wall[name].append((time.perf_counter() - w0) / n * 1e6)
            cpu[name].append((time.process_time() - c0) / n * 1e6)
    return {n: {"wall_us": statistics.median(wall[n]), "cpu_us": statistics.median(cpu[n])} for n in variants}


_LOOP: list[asyncio.AbstractEventLoop] = []


def _loop() -> asyncio.AbstractEventLoop:
    if not _LOOP:
        _LOOP.append(asyncio.new_event_loop())
        atexit.register(_LOOP[0].close)
    return _LOOP[0]


def run_async(coro_fn: Callable[[], Any]) -> Callable[[], Any]:
    """Wrap an async callable so one persistent event loop runs it (no loop start-up per call; one
    ``run_until_complete`` per call, whose own cost — a task and two loop turns — is included)."""
    loop = _loop()
    return lambda: loop.run_until_complete(coro_fn())


def run_awaited(coro_fn: Callable[[], Any], per: int) -> Callable[[], Any]:
    """Wrap an async callable so one call awaits it ``per`` times in a running loop, as an async
    application does (divide the measured time by ``per``): no event-loop round trip per await."""
    loop = _loop()

    async def batch() -> None:
        for _ in range(per):
            await coro_fn()

    return lambda: loop.run_until_complete(batch())


def settle(timeout: float = 2.0) -> None:
    """Between two timed variants, outside the timing: wait until threads an earlier variant left
    behind have exited (the thread count has not changed for 50 ms), then collect the garbage it
    left, so the next variant pays neither for their teardown nor for a full collection they
    triggered. ``dspy.Parallel`` shuts its pool down without waiting (its 128 exiting threads compete
    with whatever runs next) and leaves enough garbage that the collector's oldest generation is
    collected during the next variant, once per rotation: without this, the same variant takes that
    ~30 ms collection in every repetition."""
    deadline = time.perf_counter() + timeout
    last, stable = threading.active_count(), 0
    while stable < 5 and time.perf_counter() < deadline:
        time.sleep(0.01)
        now = threading.active_count()
        stable = stable + 1 if now == last else 0
        last = now
    gc.collect()


def rotated_runs(
    variants: dict[str, Callable[[], Any]], reps: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Warm each variant up once, then run every variant once per repetition in rotated order,
    settling between them; the median wall and process-CPU seconds per variant."""
    for fn in variants.values():  # warm up: imports, pools, plans
        fn()
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            w0, c0 = time.perf_counter(), time.process_time()
            variants[name]()
            wall[name].append(time.perf_counter() - w0)
            cpu[name].append(time.process_time() - c0)
            settle()
    return (
        {k: statistics.median(v) for k, v in wall.items()},
        {k: statistics.median(v) for k, v in cpu.items()},
    )


def machine_note() -> str:
    """Load and a CPU speed reference, to print in table headers."""
    import os

    t0 = time.process_time()
    sum(i * i for i in range(10**5))
    ref = (time.process_time() - t0) * 1e3
    load = os.getloadavg()[0]
    return f"load average {load:.2f}; speed reference {ref:.1f} ms (sum of squares to 1e5)"


@contextlib.contextmanager
def dspy_untouched() -> Iterator[None]:
    """Inside the block DSPy's LM execution is DSPy's own: the wrapper the first pipeline call (or
    budget) installs, and the fast adapter's request lookup and pricing, are taken off, so a
    plain-DSPy variant measured in the same process as stageflow variants does not pay for them;
    they are put back after."""
    from stageflow.budgets import intercept
    from stageflow.lm.fast import _pricing, _request

    was, converting, pricing = intercept.installed(), _request.installed(), _pricing.installed()
    intercept.uninstall()
    _request.uninstall()
    _pricing.uninstall()
    try:
        yield
    finally:
        if was:
            intercept.install()
        if converting:
            _request.install()
        if pricing:
            _pricing.install()
