"""A ``CachedStage`` subclass of yours under ``retry=``: the engine retries its whole call, and its
cache looks up once per call as ``CachedStage``'s does (one miss, not one per attempt), in a
pipeline and on its own, sync and async."""

from __future__ import annotations

from typing import Any

import pytest

import stageflow
from stageflow import CachedStage, RetryPolicy
from stageflow.testing import call


class MyCached(CachedStage):
    def forward(self, **kw: Any) -> Any:
        return super().forward(**kw)

    async def aforward(self, **kw: Any) -> Any:
        return await super().aforward(**kw)


def flaky_stage(cls: type[CachedStage]) -> tuple[CachedStage, dict[str, int]]:
    calls = stageflow.untracked({"n": 0})

    def flaky(x: int) -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] % 3:
            raise ValueError("flaky")
        return {"y": x * 10}

    retry = RetryPolicy(max_attempts=3, initial_delay=0, jitter=0, retry_on=ValueError)
    return cls(flaky, writes=["y"], retry=retry), calls


@pytest.mark.parametrize("cls", [CachedStage, MyCached], ids=["CachedStage", "subclass"])
async def test_one_miss_per_call_in_a_pipeline(cls: type[CachedStage], mode: str) -> None:
    stage, calls = flaky_stage(cls)
    pipeline = stageflow.SequentialPipeline([stage])
    first = await call(pipeline, mode, x=1)
    second = await call(pipeline, mode, x=1)
    assert (first.y, second.y) == (10, 10)
    assert calls["n"] == 3
    assert (stage.cache_hits, stage.cache_misses) == (1, 1)
    assert [e.kind for e in first.run.events] == ["retry", "retry"]
    assert [e.kind for e in second.run.events] == ["cache_hit"]


@pytest.mark.parametrize("cls", [CachedStage, MyCached], ids=["CachedStage", "subclass"])
async def test_one_miss_per_call_alone(cls: type[CachedStage], mode: str) -> None:
    stage, calls = flaky_stage(cls)
    assert (await call(stage, mode, x=2))["y"] == 20
    assert (await call(stage, mode, x=2))["y"] == 20
    assert calls["n"] == 3
    assert (stage.cache_hits, stage.cache_misses) == (1, 1)


async def test_same_inputs_twice_in_one_call_hit_the_second_time(mode: str) -> None:
    """The once-per-call lookup only skips a retried attempt: a subclass whose own code calls the
    cache twice with the same inputs finds what the first call stored."""
    ran = stageflow.untracked([])

    def double(x: int) -> dict[str, int]:
        ran.append(x)
        return {"y": x * 2}

    class Twice(CachedStage):
        def forward(self, **kw: Any) -> Any:
            super().forward(**kw)
            return super().forward(**kw)

    stage = Twice(double, writes=["y"], retry=2)
    result = await call(stageflow.SequentialPipeline([stage]), mode, x=4)
    assert result.y == 8
    assert ran == [4]
    assert (stage.cache_hits, stage.cache_misses) == (1, 1)
