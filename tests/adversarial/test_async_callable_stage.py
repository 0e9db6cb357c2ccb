"""An object whose ``__call__`` is ``async def`` is an async stage (issue 12 verification).

Reproducer: ``stageflow.stage(C(), writes=["y"])`` with ``async def __call__`` was run as a sync
stage, so the un-awaited coroutine objects were collected as the outputs (and Python warned that
they were never awaited): a silent wrong result.
"""

from __future__ import annotations

import asyncio

import stageflow
from stageflow.testing import call


class Doubler:
    async def __call__(self, x: int) -> dict[str, int]:
        await asyncio.sleep(0)
        return {"y": 2 * x}


async def test_an_async_callable_object_is_awaited(mode: str) -> None:
    stage = stageflow.stage(Doubler(), writes=["y"])
    assert stage.is_async
    each = stageflow.ForEach(stage, over="xs", item="x", collect="ys")
    assert (await call(each, mode, xs=[1, 2, 3])).ys == [2, 4, 6]
    seq = stageflow.SequentialPipeline([stageflow.stage(Doubler(), writes=["y"])])
    assert (await call(seq, mode, x=5)).y == 10


def test_plain_callables_and_classes_stay_sync() -> None:
    class Plain:
        def __call__(self, x: int) -> dict[str, int]:
            return {"y": x}

    assert not stageflow.stage(Plain(), writes=["y"]).is_async
    assert not stageflow.stage(lambda x: {"y": x}, writes=["y"]).is_async
