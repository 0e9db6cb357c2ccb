"""A ``LazyStage`` in a pipeline: its deferred work runs as part of the stage's call, so a failure
there is the stage's failure (a ``StageError`` naming it) and the stage's policies cover it (retry,
fallback, timeout, skip), sync and async."""

from __future__ import annotations

import time
from typing import Any

import pytest

import stageflow
from stageflow import ErrorHandlingPipeline, LazyStage, RetryPolicy, SequentialPipeline, Stage
from stageflow.errors import StageError, StageTimeoutError
from stageflow.testing import call


@stageflow.stage(writes=["a"])
def first(q: int) -> dict[str, int]:
    return {"a": q + 1}


def failing(error: Exception) -> Any:
    @stageflow.stage(writes=["z"])
    def summarize(a: int) -> dict[str, int]:
        raise error

    return summarize


async def test_a_failure_is_the_stages_named_error(mode: str) -> None:
    pipeline = SequentialPipeline([first, LazyStage(failing(ValueError("summary failed")))])
    with pytest.raises(StageError) as info:
        await call(pipeline, mode, q=1)
    assert info.value.stage_path == "stages[1]"
    assert isinstance(info.value.__cause__, ValueError)
    assert "summary failed" in str(info.value)


async def test_retry_covers_the_deferred_work(mode: str) -> None:
    calls = stageflow.untracked({"n": 0})

    @stageflow.stage(writes=["z"])
    def flaky(a: int) -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("down")
        return {"z": a * 10}

    retry = RetryPolicy(max_attempts=2, initial_delay=0, jitter=0, retry_on=ConnectionError)
    pipeline = SequentialPipeline([first, Stage(LazyStage(flaky), retry=retry)])
    result = await call(pipeline, mode, q=1)
    assert result.z == 20
    assert calls["n"] == 2
    assert [e.kind for e in result.run.events] == ["retry"]


async def test_fallback_replaces_a_failed_lazy_stage(mode: str) -> None:
    pipeline = SequentialPipeline([first, Stage(LazyStage(failing(ValueError("x"))), fallback={"z": -1})])
    result = await call(pipeline, mode, q=1)
    assert result.z == -1
    assert [e.kind for e in result.run.events] == ["fallback"]


async def test_timeout_covers_the_deferred_work(mode: str) -> None:
    @stageflow.stage(writes=["z"])
    def slow(a: int) -> dict[str, int]:
        time.sleep(0.5)
        return {"z": a}

    pipeline = SequentialPipeline([first, Stage(LazyStage(slow), timeout=0.05)])
    with pytest.raises(StageTimeoutError):
        await call(pipeline, mode, q=1)


async def test_error_handling_pipeline_skips_a_lazy_timeout(mode: str) -> None:
    pipeline = ErrorHandlingPipeline([first, LazyStage(failing(TimeoutError("slow model")))])
    result = await call(pipeline, mode, q=1)
    assert result.a == 2
    assert "z" not in result
    assert [e.kind for e in result.run.events] == ["skipped"]


async def test_a_lazy_stage_that_succeeds_merges_its_fields(mode: str) -> None:
    ran = stageflow.untracked([])

    @stageflow.stage(writes=["z"])
    def summarize(a: int) -> dict[str, int]:
        ran.append(a)
        return {"z": a * 3}

    result = await call(SequentialPipeline([first, LazyStage(summarize)]), mode, q=1)
    assert result.z == 6
    assert ran == [2]


async def test_on_its_own_a_lazy_stage_with_policies_stays_lazy(mode: str) -> None:
    ran = stageflow.untracked([])

    @stageflow.stage(writes=["z"])
    def summarize(a: int) -> dict[str, int]:
        ran.append(a)
        return {"z": a * 3}

    pending = await call(Stage(LazyStage(summarize), retry=2), mode, a=2)
    assert (type(pending).__name__, pending.done, ran) == ("LazyResult", False, [])
    assert pending["z"] == 6
    assert ran == [2]
