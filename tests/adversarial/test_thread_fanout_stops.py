"""Thread fan-outs stop starting branches when they must (issue 12 verification).

Reproducers:
- Ctrl-C while a sync ``ForEach`` was still handing its workers to the pool: the caller got
  ``KeyboardInterrupt``, yet ~2,400 of 3,000 elements started afterwards in the background.
- A fail-fast ``ForEach`` of ``def`` stages with a ``timeout=`` under ``acall``: every remaining
  element (1,924 of 2,000) ran after the first had failed, each on a thread of its own.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import stageflow
from stageflow import StageError
from stageflow.engine import fanout


class _Started:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[int] = []

    def __len__(self) -> int:
        with self.lock:
            return len(self.items)


def _each(started: _Started, fail: int | None = None, **options: Any) -> stageflow.ForEach:
    def work(x: int) -> dict[str, int]:
        with started.lock:
            started.items.append(x)
        if x == fail:
            raise ValueError(f"element {x}")
        time.sleep(0.01)
        return {"y": x}

    return stageflow.ForEach(
        stageflow.stage(work, writes=["y"]), over="xs", item="x", collect="ys", **options
    )


@pytest.mark.parametrize("general", [False, True], ids=["bare", "general"])
def test_an_interrupt_while_workers_are_handed_out_stops_them(
    monkeypatch: pytest.MonkeyPatch, general: bool
) -> None:
    # (a fan-out with a timeout hands its workers to spare threads, one without to the shared pool)
    real = fanout._DETACHED if general else fanout._SHARED
    submitted = [0]

    class Pool:
        def run_soon(self, fn: Any, *args: Any) -> Any:
            submitted[0] += 1
            if submitted[0] == 3:
                raise KeyboardInterrupt  # Ctrl-C lands while the third worker is handed out
            return real.run_soon(fn, *args)

    monkeypatch.setattr(fanout, "_SHARED", Pool())
    monkeypatch.setattr(fanout, "_DETACHED", Pool())
    started = _Started()
    with pytest.raises(KeyboardInterrupt):
        _each(started, **({"timeout": 60.0} if general else {}))(xs=list(range(300)))
    time.sleep(0.1)
    settled = len(started)
    time.sleep(0.3)
    assert len(started) == settled <= 4  # the two workers finish what they hold and take no more


@pytest.mark.parametrize("timeout", [None, 60.0])
async def test_fail_fast_under_acall_stops_def_stages_with_or_without_a_timeout(
    timeout: float | None,
) -> None:
    started = _Started()
    each = _each(started, fail=0, **({"timeout": timeout} if timeout else {}))
    with pytest.raises(StageError, match="element 0"):
        await each.acall(xs=list(range(1000)))
    await asyncio.sleep(0.2)
    assert len(started) < 200  # those already running when element 0 failed; never the rest


async def test_cancelling_an_acall_of_def_stages_with_a_timeout_starts_no_more() -> None:
    started = _Started()
    each = _each(started, timeout=60.0, max_concurrency=4)
    task = asyncio.ensure_future(each.acall(xs=list(range(400))))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    settled = len(started)
    await asyncio.sleep(0.2)
    assert len(started) == settled < 400


async def test_a_cancel_before_the_worker_starts_the_fan_out_starts_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Reproducer (a loaded machine): the acall was cancelled after its worker thread had begun but
    # before the thread's fan-out registered its stopper; the fan-out then ran every element.
    from stageflow.patterns import _fanout

    entered, go = threading.Event(), threading.Event()
    original = _fanout._entries
    loop_thread = threading.current_thread()

    def slow_entries(branches: Any) -> Any:
        if threading.current_thread() is not loop_thread:  # the worker, before its fan-out starts
            entered.set()
            go.wait(5)
        return original(branches)

    monkeypatch.setattr(_fanout, "_entries", slow_entries)
    started = _Started()
    each = _each(started, timeout=60.0, max_concurrency=4)
    task = asyncio.ensure_future(each.acall(xs=list(range(100))))
    while not entered.is_set():
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    go.set()
    await asyncio.sleep(0.3)
    assert len(started) == 0


def _nested(started: _Started, trigger: int | None = None) -> stageflow.ForEach:
    """An outer ForEach of def stages, each running an inner ForEach of 100 elements (2 at a time)."""
    inner = _each(started, max_concurrency=2)

    def group(g: int) -> dict[str, Any]:
        if g == trigger:
            time.sleep(0.05)
            raise KeyboardInterrupt
        return {"ys": inner(xs=list(range(g * 1000, g * 1000 + 100))).ys}

    return stageflow.ForEach(
        stageflow.stage(group, writes=["ys"]), over="groups", item="g", collect="out", max_concurrency=2
    )


async def test_cancelling_an_acall_stops_the_fan_outs_its_running_branches_started() -> None:
    # Reproducer (helper 75, t21b): the outer fan-out stopped, but the inner ForEach of each running
    # def stage went on starting its elements (~85 of them more than 50 ms after the cancel).
    started = _Started()
    task = asyncio.ensure_future(_nested(started).acall(groups=[0, 1, 2, 3]))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    settled = len(started)
    await asyncio.sleep(0.3)
    assert len(started) == settled < 60


def test_an_interrupt_stops_the_fan_outs_running_branches_started() -> None:
    started = _Started()
    with pytest.raises(KeyboardInterrupt):
        _nested(started, trigger=1)(groups=[0, 1, 2, 3])
    time.sleep(0.05)
    settled = len(started)
    time.sleep(0.3)
    assert len(started) == settled < 60


async def test_cancelling_stops_a_fan_out_of_async_stages_a_running_branch_started() -> None:
    # Reproducer (helper 76, T2.04): a def branch running a ForEach of async def stages (it runs on
    # stageflow's background loop) went on to all 800 elements after the cancel.
    started = _Started()

    async def work(x: int) -> dict[str, int]:
        with started.lock:
            started.items.append(x)
        await asyncio.sleep(0.01)
        return {"y": x}

    inner = stageflow.ForEach(
        stageflow.stage(work, writes=["y"]), over="xs", item="x", collect="ys", max_concurrency=2
    )

    def group(g: int) -> dict[str, Any]:
        return {"ys": inner(xs=list(range(g * 1000, g * 1000 + 200))).ys}

    outer = stageflow.ForEach(
        stageflow.stage(group, writes=["ys"]), over="groups", item="g", collect="out", max_concurrency=2
    )
    task = asyncio.ensure_future(outer.acall(groups=[0, 1, 2, 3]))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    settled = len(started)
    await asyncio.sleep(0.3)
    assert len(started) == settled < 100
