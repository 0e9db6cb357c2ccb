"""A stage's own ``concurrent.futures.CancelledError`` (a future it waited on was cancelled) is its
error in both modes. Under ``acall`` the executor's future turned it into asyncio's
``CancelledError`` — an interrupt: the fallback was skipped and the call was cancelled, where the sync
call applied the fallback (helper 102, F6)."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import pytest

import stageflow
from stageflow import SequentialPipeline, Stage, stage
from stageflow.testing import call


def _waits_on_a_cancelled_future(x: int) -> dict[str, Any]:
    future: concurrent.futures.Future[int] = concurrent.futures.Future()
    future.cancel()
    return {"y": future.result()}


async def test_the_fallback_applies_in_both_modes(mode: str) -> None:
    program = SequentialPipeline(
        [Stage(stage(_waits_on_a_cancelled_future, writes=["y"]), fallback={"y": -1})]
    )
    assert (await call(program, mode, x=1)).y == -1


async def test_without_a_fallback_it_is_the_stages_error_in_both_modes(mode: str) -> None:
    program = SequentialPipeline([stage(_waits_on_a_cancelled_future, writes=["y"])])
    with pytest.raises(stageflow.StageError) as caught:
        await call(program, mode, x=1)
    assert isinstance(caught.value.__cause__, concurrent.futures.CancelledError)


async def _awaits_on_a_cancelled_future(x: int) -> dict[str, Any]:
    return _waits_on_a_cancelled_future(x)


async def test_an_async_stages_own_error_gets_the_fallback_in_both_modes(mode: str) -> None:
    """(helper 103, F7) The mirror case: a sync call runs an ``async def`` stage on stageflow's
    loop, and its own ``concurrent.futures.CancelledError`` became an interrupt there."""
    stage_ = Stage(stage(_awaits_on_a_cancelled_future, writes=["y"]), fallback={"y": -1})
    assert (await call(SequentialPipeline([stage_]), mode, x=1)).y == -1
