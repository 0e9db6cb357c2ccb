"""TimeoutPolicy: slow stages fail with StageTimeoutError, sync and async; fallbacks and retries after it."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from stageflow import (
    Fallback,
    RetryPolicy,
    SequentialPipeline,
    Stage,
    StageError,
    StageflowError,
    StageTimeoutError,
    TimeoutPolicy,
    stage,
)
from stageflow.engine.concurrency import abandoned_threads
from stageflow.testing import call

SLOW = 0.5
LIMIT = 0.05


def slow_fn(x: str) -> dict[str, Any]:
    time.sleep(SLOW)
    return {"y": "slow"}


async def slow_async(x: str) -> dict[str, Any]:
    await asyncio.sleep(SLOW)
    return {"y": "slow"}


def slow_stage(kind: str) -> Any:
    return stage(slow_fn if kind == "blocking" else slow_async, writes=["y"])


CASES = [("sync", "blocking"), ("async", "blocking"), ("async", "coroutine")]


@pytest.mark.parametrize(("mode", "kind"), CASES)
async def test_slow_stage_raises_stage_timeout_error(mode: str, kind: str) -> None:
    p = SequentialPipeline([lambda x: {"x2": x}, Stage(slow_stage(kind), timeout=LIMIT)])
    with pytest.raises(StageTimeoutError) as info:
        await call(p, mode, x="in")
    err = info.value
    assert isinstance(err, StageflowError)
    assert isinstance(err, StageError)
    assert isinstance(err, TimeoutError)
    assert err.code == "stage_timeout"
    assert err.stage_path == "stages[1]"
    assert "stages[1]" in str(err)
    assert str(LIMIT) in str(err)


async def test_sync_coroutine_stage_under_timeout() -> None:
    p = SequentialPipeline([Stage(slow_stage("coroutine"), timeout=LIMIT)])
    with pytest.raises(StageTimeoutError):
        p(x="in")


def test_timeout_is_caught_as_builtin_timeout_error() -> None:
    p = SequentialPipeline([Stage(slow_stage("blocking"), timeout=TimeoutPolicy(LIMIT))])
    with pytest.raises(TimeoutError):
        p(x="in")


def test_nested_stage_timeout_has_the_full_path() -> None:
    inner = SequentialPipeline([Stage(slow_stage("blocking"), timeout=LIMIT)])
    outer = SequentialPipeline([lambda x: {"z": x}, inner])
    with pytest.raises(StageTimeoutError) as info:
        outer(x="in")
    assert info.value.stage_path == "stages[1].stages[0]"


@pytest.mark.parametrize(("mode", "kind"), CASES)
async def test_fallback_default_after_timeout(mode: str, kind: str) -> None:
    p = SequentialPipeline(
        [
            Stage(slow_stage(kind), timeout=LIMIT, fallback=Fallback(default={"y": "fallback"})),
            lambda y: {"z": y + "!"},
        ]
    )
    r = await call(p, mode, x="in")
    assert r.y == "fallback"
    assert r.z == "fallback!"
    assert [e.kind for e in r.run.events] == ["timeout", "fallback"]
    assert all(e.stage == "stages[0]" for e in r.run.events)
    assert r.run.events[0].error.startswith("StageTimeoutError")


def test_a_mapping_fallback_is_a_default_output() -> None:
    p = SequentialPipeline([Stage(slow_stage("blocking"), timeout=LIMIT, fallback={"y": "dflt"})])
    assert p(x="in").y == "dflt"


def test_sync_timeout_counts_an_abandoned_thread() -> None:
    before = abandoned_threads()
    p = SequentialPipeline([Stage(slow_stage("blocking"), timeout=LIMIT)])
    with pytest.raises(StageTimeoutError):
        p(x="in")
    assert abandoned_threads() == before + 1


async def test_async_timeout_of_a_coroutine_abandons_nothing() -> None:
    before = abandoned_threads()
    p = SequentialPipeline([Stage(slow_stage("coroutine"), timeout=LIMIT)])
    with pytest.raises(StageTimeoutError):
        await p.acall(x="in")
    assert abandoned_threads() == before


async def test_async_timeout_cancels_the_coroutine() -> None:
    finished = []

    async def body(x: str) -> dict[str, Any]:
        await asyncio.sleep(SLOW)
        finished.append(x)
        return {"y": x}

    p = SequentialPipeline([Stage(stage(body, writes=["y"]), timeout=LIMIT)])
    with pytest.raises(StageTimeoutError):
        await p.acall(x="in")
    await asyncio.sleep(LIMIT)
    assert finished == []


async def test_a_timeout_is_retryable(mode: str) -> None:
    n = {"calls": 0}
    lock = threading.Lock()

    def first_slow(x: str) -> dict[str, Any]:
        with lock:
            n["calls"] += 1
            first = n["calls"] == 1
        if first:
            time.sleep(SLOW)
        return {"y": f"call {n['calls']}"}

    delays: list[float] = []

    async def asleep(d: float) -> None:
        delays.append(d)

    retry = RetryPolicy(max_attempts=2, sleep=delays.append, asleep=asleep, jitter=0)
    p = SequentialPipeline([Stage(stage(first_slow, writes=["y"]), timeout=0.1, retry=retry)])
    r = await call(p, mode, x="in")
    assert r.y == "call 2"
    assert [e.kind for e in r.run.events] == ["retry"]
    assert r.run.events[0].error.startswith("StageTimeoutError")
    assert len(delays) == 1


def test_fast_stage_under_timeout_is_unaffected() -> None:
    p = SequentialPipeline([Stage(lambda x: {"y": x * 2}, writes=["y"], timeout=5)])
    r = p(x="ab")
    assert r.y == "abab"
    assert r.run.events == []


def test_every_attempt_timing_out_raises_the_timeout() -> None:
    retry = RetryPolicy(max_attempts=2, sleep=lambda s: None)
    p = SequentialPipeline([Stage(slow_stage("blocking"), timeout=LIMIT, retry=retry)])
    with pytest.raises(StageTimeoutError):
        p(x="in")


def test_timeout_error_is_the_error_raised_not_a_wrapper() -> None:
    p = SequentialPipeline([Stage(slow_stage("blocking"), timeout=LIMIT)])
    with pytest.raises(StageflowError) as info:
        p(x="in")
    assert type(info.value) is StageTimeoutError
