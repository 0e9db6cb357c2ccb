"""The critical path of a run whose fan-out stopped some of its branches goes through what stopped
them, never through a stopped branch (session 34's open item: with a fail-fast ``ForEach`` the path
went through a branch the failure cancelled, which ended a moment after it)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import stageflow
from stageflow import ForEach, SequentialPipeline, StageError, stage
from stageflow.testing import call


def _fan_out(mode: str, release: threading.Event) -> Any:
    """Item 0 fails after 50 ms; the others would run on for seconds (until ``release``)."""
    if mode == "async":

        async def work(x: int) -> dict[str, int]:
            await asyncio.sleep(0.05)
            if x == 0:
                raise ValueError("item 0 failed")
            await asyncio.sleep(5)
            return {"y": x}

    else:

        def work(x: int) -> dict[str, int]:  # type: ignore[misc]
            time.sleep(0.05)
            if x == 0:
                raise ValueError("item 0 failed")
            release.wait(5)
            return {"y": x}

    return SequentialPipeline(
        [ForEach(stage(work, reads=["x"], writes=["y"]), over="xs", item="x", collect="ys")]
    )


async def test_a_fail_fast_fan_outs_path_goes_through_the_item_that_failed(mode: str) -> None:
    release = threading.Event()
    program = _fan_out(mode, release)
    try:
        with stageflow.profile() as prof, pytest.raises(StageError, match="item 0 failed"):
            await call(program, mode, xs=[0, 1, 2, 3])
    finally:
        release.set()
    run = prof.last_run
    assert run is not None
    assert [step.path for step in run.critical_path] == ["stages[0].stage[0]"]
    summary = prof.get_performance_summary()
    assert summary["stages[0].stage[0]"]["errors"] == 1
    assert run.ideal_time <= run.critical_time <= run.wall
