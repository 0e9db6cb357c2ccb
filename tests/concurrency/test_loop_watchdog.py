"""Code of yours that blocks stageflow's background loop is named in a warning
(``stageflow.engine.loop_watchdog``): every sync fan-out of LM stages in the process waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from typing import Any

import pytest

from stageflow import SequentialPipeline, stage
from stageflow.engine import loop_watchdog
from stageflow.engine.loop_watchdog import blocking_site
from stageflow.engine.pool import _background_loop


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop_watchdog, "BLOCKED_AFTER", 0.2)
    monkeypatch.setattr(loop_watchdog, "CHECK_EVERY", 0.05)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "event loop has been blocked" in r.getMessage()]


def test_an_async_stage_that_blocks_the_loop_is_named_once(
    quick: None, caplog: pytest.LogCaptureFixture
) -> None:
    @stage(writes=["y"])
    async def sleeps_in_async_def(x: str) -> dict[str, Any]:
        time.sleep(0.6)  # (over BLOCKED_AFTER + CHECK_EVERY, whenever it starts: helper 94 saw 1.9 s missed)
        return {"y": x}

    with caplog.at_level(logging.WARNING, logger="stageflow"):
        assert SequentialPipeline([sleeps_in_async_def])(x="a").y == "a"
        assert SequentialPipeline([sleeps_in_async_def])(x="b").y == "b"
    said = _warnings(caplog)
    assert len(said) == 1  # (one warning per code location)
    assert "test_loop_watchdog.py" in said[0]
    assert "in sleeps_in_async_def()" in said[0]
    assert "must not block" in said[0]


def test_an_async_stage_that_awaits_is_not_named(quick: None, caplog: pytest.LogCaptureFixture) -> None:
    @stage(writes=["y"])
    async def awaits(x: str) -> dict[str, Any]:
        await asyncio.sleep(0.6)
        return {"y": x}

    with caplog.at_level(logging.WARNING, logger="stageflow"):
        assert SequentialPipeline([awaits])(x="a").y == "a"
    assert _warnings(caplog) == []


def test_the_watchdog_runs_beside_the_loop() -> None:
    _background_loop()
    assert "stageflow-loop-watchdog" in {t.name for t in threading.enumerate()}


def test_the_site_is_the_innermost_frame_outside_asyncio() -> None:
    frame = sys._getframe()
    site, line = blocking_site(frame), frame.f_lineno
    assert site == f"{__file__}:{line} in test_the_site_is_the_innermost_frame_outside_asyncio()"
    assert blocking_site(None) is None

    async def inner() -> str | None:
        return blocking_site(sys._getframe().f_back)  # (the frames of asyncio's loop above it)

    above = asyncio.run(inner())  # (asyncio's frames skipped: the caller of asyncio.run)
    assert above is not None
    assert above.endswith("in test_the_site_is_the_innermost_frame_outside_asyncio()")


def test_a_busy_loop_that_is_never_blocked_is_not_named(
    quick: None, caplog: pytest.LogCaptureFixture
) -> None:
    # (helper 95: thousands of short steps kept the heartbeat waiting behind them for over a second)
    @stage(writes=["y"])
    async def short_steps(item: int) -> dict[str, Any]:
        for _ in range(3):
            t = time.perf_counter()
            while time.perf_counter() - t < 0.004:  # (4 ms of CPU, then the loop moves on)
                pass
            await asyncio.sleep(0.01)
        return {"y": item}

    from stageflow import ForEach

    with caplog.at_level(logging.WARNING, logger="stageflow"):
        SequentialPipeline([ForEach(short_steps, over="xs", item="item", collect={"y": "ys"})])(
            xs=list(range(150))
        )
    assert _warnings(caplog) == []


def test_a_wait_inside_the_standard_library_names_your_line(
    quick: None, caplog: pytest.LogCaptureFixture
) -> None:
    # (helper 95: queue.get named queue.py, once for every caller)
    import queue

    @stage(writes=["y"])
    async def waits_on_a_queue(x: str) -> dict[str, Any]:
        with contextlib.suppress(queue.Empty):
            queue.Queue().get(timeout=0.6)
        return {"y": x}

    with caplog.at_level(logging.WARNING, logger="stageflow"):
        SequentialPipeline([waits_on_a_queue])(x="a")
    said = _warnings(caplog)
    assert len(said) == 1
    assert "in waits_on_a_queue() (waiting in " in said[0]
    assert "queue.py" in said[0]
