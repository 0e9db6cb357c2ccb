"""A failure replaced inside a cached call is seen in the threads the call fans out to as well:
``dspy.Parallel``'s workers (DSPy carries the cache's watch with its settings) and threads started
with the caller's context; the replaced output is never cached, a healthy one still is."""

from __future__ import annotations

import concurrent.futures
import contextvars
from collections.abc import Callable
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import CachedStage, SequentialPipeline, Stage
from stageflow.testing import call


def service() -> tuple[dict[str, bool], Stage]:
    state = stageflow.untracked({"down": True})

    def work(x: int) -> dict[str, str]:
        if state["down"]:
            raise ConnectionError("service down")
        return {"y": f"real:{x}"}

    return state, Stage(stageflow.stage(work, writes=["y"]), fallback={"y": "FB"})


class Calls(dspy.Module):  # type: ignore[misc]
    def __init__(self, inner: Stage) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: int) -> Any:
        return self.inner(x=x)


def with_dspy_parallel(inner: Stage) -> Callable[..., dict[str, list[str]]]:
    def fan(xs: list[int]) -> dict[str, list[str]]:
        outs = dspy.Parallel(num_threads=2, disable_progress_bar=True)([(Calls(inner), {"x": v}) for v in xs])
        return {"ys": [o["y"] for o in outs]}

    return fan


def with_context_threads(inner: Stage) -> Callable[..., dict[str, list[str]]]:
    def fan(xs: list[int]) -> dict[str, list[str]]:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(contextvars.copy_context().run, lambda v=v: inner(x=v)) for v in xs]
            return {"ys": [f.result()["y"] for f in futures]}

    return fan


FANS = {"dspy.Parallel": with_dspy_parallel, "threads with the caller's context": with_context_threads}
CACHES: dict[str, Callable[[Callable[..., Any]], Any]] = {
    "CachedStage": lambda fn: CachedStage(stageflow.stage(fn, writes=["ys"])),
    "Stage(cache=True) in a pipeline": lambda fn: SequentialPipeline(
        [Stage(stageflow.stage(fn, writes=["ys"]), cache=True)]
    ),
}


@pytest.mark.parametrize("fan", list(FANS))
@pytest.mark.parametrize("cache", list(CACHES))
async def test_a_fallback_in_a_worker_thread_is_not_cached(mode: str, fan: str, cache: str) -> None:
    state, inner = service()
    cached = CACHES[cache](FANS[fan](inner))
    first = await call(cached, mode, xs=[1, 2])
    assert first["ys"] == ["FB", "FB"]
    state["down"] = False
    again = await call(cached, mode, xs=[1, 2])
    assert again["ys"] == ["real:1", "real:2"]


@pytest.mark.parametrize("fan", list(FANS))
async def test_a_healthy_fan_out_in_worker_threads_is_still_cached(mode: str, fan: str) -> None:
    state, inner = service()
    state["down"] = False
    runs = stageflow.untracked([])

    def counted(xs: list[int]) -> dict[str, list[str]]:
        runs.append(xs)
        return FANS[fan](inner)(xs)

    cached = CachedStage(stageflow.stage(counted, writes=["ys"]))
    assert (await call(cached, mode, xs=[3]))["ys"] == ["real:3"]
    assert (await call(cached, mode, xs=[3]))["ys"] == ["real:3"]
    assert len(runs) == 1


def test_dspy_parallel_outside_any_cache_is_untouched() -> None:
    _, inner = service()
    outs = with_dspy_parallel(inner)([1])
    assert outs == {"ys": ["FB"]}
    assert stageflow.stages.degraded_watch() is None
