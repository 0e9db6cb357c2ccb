"""A ``Stage`` / ``CachedStage`` subclass of yours that overrides ``__call__`` / ``acall``: its
override runs once per attempt under ``retry=``, called on its own as in a pipeline (where the
engine calls it once per attempt), through any number of subclass levels."""

from __future__ import annotations

import inspect
from typing import Any

import pytest

import stageflow
from stageflow import CachedStage, RetryPolicy, SequentialPipeline, Stage
from stageflow.testing import call

RETRY = RetryPolicy(max_attempts=3, initial_delay=0, jitter=0, retry_on=ConnectionError)


def subclass(base: type[Stage], log: list[str], *, level: str = "") -> type[Stage]:
    class Mine(base):  # type: ignore[valid-type, misc]
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            log.append(f"call{level}")
            return super().__call__(*args, **kwargs)

        async def acall(self, *args: Any, **kwargs: Any) -> Any:
            log.append(f"acall{level}")
            return await super().acall(*args, **kwargs)

    return Mine


def flaky(counter: dict[str, int]) -> Any:
    def f(x: int) -> dict[str, int]:
        counter["n"] += 1
        if counter["n"] == 1:
            raise ConnectionError("down")
        return {"y": x + 1}

    return f


async def run_where(where: str, build: Any, mode: str) -> tuple[int, int, list[str]]:
    log, counter = stageflow.untracked([]), stageflow.untracked({"n": 0})
    stage = build(log)(flaky(counter), writes=["y"], retry=RETRY)
    if where == "alone":
        out = (await call(stage, mode, x=1))["y"]
    else:
        out = (await call(SequentialPipeline([stage]), mode, x=1)).y
    return out, counter["n"], list(log)


@pytest.mark.parametrize("base", [Stage, CachedStage], ids=["Stage", "CachedStage"])
async def test_override_runs_per_attempt_alone_as_in_a_pipeline(base: type[Stage], mode: str) -> None:
    def build(log: list[str]) -> type[Stage]:
        return subclass(base, log)

    alone = await run_where("alone", build, mode)
    piped = await run_where("pipeline", build, mode)
    method = "call" if mode == "sync" else "acall"
    assert alone == piped == (2, 2, [method, method])


async def test_two_levels_of_overrides_each_run_per_attempt(mode: str) -> None:
    def build(log: list[str]) -> type[Stage]:
        return subclass(subclass(Stage, log, level="-inner"), log, level="-outer")

    alone = await run_where("alone", build, mode)
    piped = await run_where("pipeline", build, mode)
    method = "call" if mode == "sync" else "acall"
    once = [f"{method}-outer", f"{method}-inner"]
    assert alone == piped == (2, 2, once * 2)


async def test_without_policies_the_override_runs_once(mode: str) -> None:
    log = stageflow.untracked([])
    stage = subclass(Stage, log)(lambda x: {"y": x}, writes=["y"])
    assert (await call(stage, mode, x=3))["y"] == 3
    assert log == ["call" if mode == "sync" else "acall"]


def test_the_override_keeps_its_name_and_signature() -> None:
    class Mine(Stage):
        def __call__(self, *, x: int) -> Any:
            """Mine's call."""
            return super().__call__(x=x)

    assert Mine.__call__.__name__ == "__call__"
    assert Mine.__call__.__doc__ == "Mine's call."
    assert list(inspect.signature(Mine.__call__).parameters) == ["self", "x"]
