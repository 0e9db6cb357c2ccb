"""A stage whose wrapped function calls the same ``Stage`` again (recursion): the inner call has the
stage's policies too, called on its own or in a pipeline, for a plain ``Stage`` and a subclass."""

from __future__ import annotations

import collections
from typing import Any

import pytest

import stageflow
from stageflow import RetryPolicy, SequentialPipeline, Stage
from stageflow.testing import call

RETRY = RetryPolicy(max_attempts=2, initial_delay=0, jitter=0, retry_on=ConnectionError)


class Sub(Stage):
    def forward(self, **kw: Any) -> Any:
        return super().forward(**kw)


@pytest.mark.parametrize("cls", [Stage, Sub], ids=["Stage", "subclass"])
@pytest.mark.parametrize("where", ["alone", "pipeline"])
async def test_the_inner_call_retries_itself(cls: type[Stage], where: str, mode: str) -> None:
    calls: collections.Counter[int] = collections.Counter()
    holder: dict[str, Stage] = {}

    def countdown(n: int) -> dict[str, int]:
        calls[n] += 1
        if n == 1 and calls[n] == 1:
            raise ConnectionError("the inner call's first attempt fails")
        return {"y": holder["stage"](n=n - 1)["y"] + 1} if n > 0 else {"y": 0}

    stage = holder["stage"] = cls(stageflow.stage(countdown, writes=["y"]), retry=RETRY)
    if where == "alone":
        y = (await call(stage, mode, n=2))["y"]
    else:
        y = (await call(SequentialPipeline([stage]), mode, n=2)).y
    assert y == 2
    # the inner call (n=1) retried itself; the outer one (n=2) ran once
    assert (calls[2], calls[1], calls[0]) == (1, 2, 1)
