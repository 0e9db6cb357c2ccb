"""A ``BaseException`` of yours raised in a fan-out branch reaches the caller (helper 89).

Before: the async fan-out (``afan_out``) caught ``KeyboardInterrupt`` and ``SystemExit`` only, so
another ``BaseException`` subclass was handed back by ``gather`` as the branch's result and dropped:
the ForEach returned ``None`` for that item with status ``skipped`` and no error. Now any
``BaseException`` that is not an ``Exception`` stops the siblings and is re-raised, as the sync
threads path and a single stage do.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from stageflow import ForEach, ParallelPipeline, SequentialPipeline, Stage, stage
from stageflow.testing import call


class Boom(BaseException):
    pass


async def _item(x: str) -> dict[str, str]:
    await asyncio.sleep(0)
    if x == "bad":
        raise Boom(x)
    return {"y": x.upper()}


def _bare() -> Any:
    return stage(_item, writes=["y"])


def _wrapped() -> Any:  # (a policy around it: the engine's task fan-out, not the bare one)
    return Stage(_item, writes=["y"], retry=2)


@pytest.mark.parametrize("make", [_bare, _wrapped], ids=["bare", "with-policy"])
@pytest.mark.parametrize("on_error", ["fail_fast", "collect", "skip"])
def test_foreach(make: Any, on_error: str, mode: str) -> None:
    fe = ForEach(make(), over="xs", item="x", collect="ys", on_error=on_error)
    with pytest.raises(Boom):
        asyncio.run(call(SequentialPipeline([fe]), mode, xs=["a", "bad", "c"]))


def test_parallel(mode: str) -> None:
    async def fine(x: str) -> dict[str, str]:
        return {"z": x}

    p = ParallelPipeline([_wrapped(), stage(fine, writes=["z"])])
    with pytest.raises(Boom):
        asyncio.run(call(p, mode, x="bad"))
