"""Helper 82's findings on this session's fixes, one test each: an async function behind a plain
wrapper, fan-outs that went on past failed branches inside a cache, a lazy stage around a renaming
stage, a mixin's ``__call__``, and what the run-time name lookup check flags."""

from __future__ import annotations

import functools
from typing import Any

import _dynamic_helpers as helpers
import pytest

import stageflow
from stageflow import (
    CachedStage,
    EnsemblePipeline,
    ForEach,
    LazyStage,
    RetryPolicy,
    SequentialPipeline,
    Stage,
)
from stageflow._fp_dynamic import dynamic_reads
from stageflow.testing import call


async def answer(x: int) -> dict[str, int]:
    return {"y": x + 1}


def logged(f: Any) -> Any:
    @functools.wraps(f)
    def wrapper(**kw: Any) -> Any:
        return f(**kw)

    return wrapper


async def test_an_async_function_behind_a_plain_wrapper_is_awaited(mode: str) -> None:
    stage = Stage(logged(answer), reads=["x"], writes=["y"])
    assert dict(await call(stage, mode, x=1)) == {"y": 2}
    assert (await call(SequentialPipeline([stage]), mode, x=1)).y == 2


def fan_outs(down: dict[str, bool]) -> dict[str, Any]:
    def work(n: int) -> dict[str, int]:
        if down["on"] and n == 2:
            raise ConnectionError("service down")
        return {"z": n * 10}

    async def awork(n: int) -> dict[str, int]:
        return work(n)

    def steady(nums: list[int]) -> dict[str, Any]:
        return {"answer": "A", "confidence": 0.5}

    def better(nums: list[int]) -> dict[str, Any]:
        if down["on"]:
            raise ConnectionError("down")
        return {"answer": "B", "confidence": 0.9}

    members = [
        stageflow.stage(steady, writes=["answer", "confidence"]),
        stageflow.stage(better, writes=["answer", "confidence"]),
    ]
    return {
        "foreach-skip": ForEach(
            stageflow.stage(work, writes=["z"]), over="nums", item="n", collect={"z": "zs"}, on_error="skip"
        ),
        "foreach-collect-async": ForEach(
            stageflow.stage(awork, writes=["z"]),
            over="nums",
            item="n",
            collect={"z": "zs"},
            on_error="collect",
        ),
        "ensemble": EnsemblePipeline(members),
    }


@pytest.mark.parametrize("kind", ["foreach-skip", "foreach-collect-async", "ensemble"])
async def test_a_fan_out_past_failed_branches_is_not_cached(kind: str, mode: str) -> None:
    down = stageflow.untracked({"on": True})
    pipeline = SequentialPipeline([CachedStage(fan_outs(down)[kind])])
    during = await call(pipeline, mode, nums=[1, 2, 3])
    down["on"] = False
    after = await call(pipeline, mode, nums=[1, 2, 3])
    assert "cache_hit" not in [e.kind for e in after.run.events]
    if kind == "ensemble":
        assert (during.answer, after.answer) == ("A", "B")
    else:
        assert after.zs == [10, 20, 30]
        assert during.zs in ([10, 30], [10, None, 30])


async def test_a_healthy_fan_out_is_still_cached(mode: str) -> None:
    down = stageflow.untracked({"on": False})
    pipeline = SequentialPipeline([CachedStage(fan_outs(down)["foreach-skip"])])
    await call(pipeline, mode, nums=[1, 2, 3])
    again = await call(pipeline, mode, nums=[1, 2, 3])
    assert [e.kind for e in again.run.events] == ["cache_hit"]


async def test_a_lazy_stage_around_a_renaming_stage_merges_the_bare_value(mode: str) -> None:
    inner = Stage(stageflow.stage(lambda x: x * 2, writes=["y"]), outputs={"y": "z"})
    assert (await call(SequentialPipeline([LazyStage(inner)]), mode, x=2)).z == 4


async def test_a_mixins_call_runs_once_per_attempt(mode: str) -> None:
    runs: list[int] = []
    calls = stageflow.untracked({"n": 0})

    class Logging:
        def __call__(self, **kw: Any) -> Any:
            runs.append(1)
            return super().__call__(**kw)  # type: ignore[misc]

        async def acall(self, **kw: Any) -> Any:
            runs.append(1)
            return await super().acall(**kw)  # type: ignore[misc]

    class MyStage(Logging, Stage):
        pass

    def work(x: int) -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] % 3:
            raise ConnectionError("flaky")
        return {"y": x}

    retry = RetryPolicy(max_attempts=3, initial_delay=0, jitter=0, retry_on=ConnectionError)
    assert dict(await call(MyStage(stageflow.stage(work, writes=["y"]), retry=retry), mode, x=1)) == {"y": 1}
    assert len(runs) == 3
    runs.clear()
    assert (
        await call(SequentialPipeline([MyStage(stageflow.stage(work, writes=["y"]), retry=retry)]), mode, x=1)
    ).y == 1
    assert len(runs) == 3


class Model:
    def eval(self) -> None:
        return None


MODEL = Model()


def predict(x: int) -> dict[str, int]:
    MODEL.eval()
    return {"y": x}


def describe_cfg(cfg: Any) -> dict[str, Any]:
    return {"y": sorted(vars(cfg))}


def through_module(x: int) -> dict[str, int]:
    return {"y": x * helpers.rate()}


def through_object(x: int) -> dict[str, int]:
    return {"y": helpers.PRICER.price(x)}


def _scaled(x: int, k: int) -> dict[str, int]:
    return {"y": x * k * globals()["K"]}


K = 1


def test_attribute_names_and_vars_of_an_object_are_not_flagged() -> None:
    assert dynamic_reads(predict) == []
    assert dynamic_reads(describe_cfg) == []


def test_lookups_in_helpers_modules_objects_and_partials_are_flagged() -> None:
    assert dynamic_reads(through_module) == ["rate"]
    assert dynamic_reads(through_object) == ["Pricer.price"]
    assert dynamic_reads(functools.partial(_scaled, k=2)) == ["_scaled"]
