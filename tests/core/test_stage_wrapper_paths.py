"""A ``Stage`` gives the same answer on every path — on its own, in a pipeline, wrapped in another
``Stage``, as a subclass of yours — sync and async (helper 80's findings, one test each)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import stageflow
from stageflow import CachedStage, RetryPolicy, SequentialPipeline, Stage
from stageflow.errors import ConfigurationError
from stageflow.testing import call

RETRY = RetryPolicy(max_attempts=3, initial_delay=0, jitter=0, retry_on=ConnectionError)


class Sub(Stage):
    def forward(self, **kw: Any) -> Any:
        return super().forward(**kw)


async def double(x: int) -> dict[str, int]:
    return {"y": 2 * x}


ASYNC_SHAPES = {
    "plain": lambda **k: Stage(double, writes=["y"], **k),
    "subclass": lambda **k: Sub(double, writes=["y"], **k),
    "stage-in-stage": lambda **k: Stage(Stage(double, writes=["y"]), **k),
}


@pytest.mark.parametrize("shape", ASYNC_SHAPES)
@pytest.mark.parametrize("policies", [{}, {"retry": 2}], ids=["bare", "retry"])
async def test_an_async_function_gives_its_result_not_a_coroutine(
    shape: str, policies: dict[str, Any], mode: str
) -> None:
    alone = await call(ASYNC_SHAPES[shape](**policies), mode, x=1)
    assert dict(alone) == {"y": 2}
    result = await call(SequentialPipeline([ASYNC_SHAPES[shape](**policies)]), mode, x=1)
    assert result.y == 2


def where(x: int) -> dict[str, str]:
    return {"y": threading.current_thread().name}


@pytest.mark.parametrize(
    "build",
    [
        lambda: stageflow.stage(where, writes=["y"]),
        lambda: Stage(where, writes=["y"]),
        lambda: Stage(Stage(where, writes=["y"])),
    ],
    ids=["function-stage", "stage", "stage-in-stage"],
)
async def test_a_plain_function_runs_off_the_event_loop_under_acall(build: Any) -> None:
    loop_thread = threading.current_thread().name
    assert (await build().acall(x=1))["y"] != loop_thread
    assert (await SequentialPipeline([build()]).acall(x=1)).y != loop_thread


def slow(x: int) -> dict[str, str]:
    time.sleep(0.5)
    return {"y": "late"}


async def test_a_timeout_around_a_stage_in_a_stage_holds(mode: str) -> None:
    pipeline = SequentialPipeline([Stage(Stage(slow, writes=["y"]), timeout=0.05, fallback={"y": "FB"})])
    result = await call(pipeline, mode, x=1)
    assert result.y == "FB"
    assert [e.kind for e in result.run.events] == ["timeout", "fallback"]


async def test_recover_sees_the_state_names_on_its_own_as_in_a_pipeline(mode: str) -> None:
    seen: list[dict[str, Any]] = []

    def bad(a: str, b: str) -> dict[str, str]:
        raise ValueError("broken")

    def rec(error: Exception, state: dict[str, Any]) -> dict[str, Any]:
        seen.append(dict(state))
        return {"out": state["a"]}

    def build() -> Stage:
        return Stage(bad, writes=["out"], inputs={"a": "b", "b": "a"}, recover=rec)

    alone = await call(build(), mode, a="A", b="B")
    piped = await call(SequentialPipeline([build()]), mode, a="A", b="B")
    assert alone["out"] == piped.out == "A"
    assert seen[0] == {"a": "A", "b": "B"}


@pytest.mark.parametrize(
    "build",
    [
        lambda f: CachedStage(Stage(f, writes=["y"], fallback={"y": "FB"})),
        lambda f: CachedStage(Stage(f, writes=["y"], recover=lambda e, s: {"y": "FB"})),
        lambda f: Stage(Stage(f, writes=["y"], fallback={"y": "FB"}), cache=True),
        lambda f: CachedStage(f, writes=["y"], fallback={"y": "FB"}),
    ],
    ids=["cached-stage-fallback", "cached-stage-recover", "cache-stage-fallback", "cached-fallback"],
)
async def test_a_replaced_failure_inside_is_never_cached(build: Any, mode: str) -> None:
    down = stageflow.untracked({"now": True})

    def service(x: int) -> dict[str, str]:
        if down["now"]:
            raise ConnectionError("down")
        return {"y": "real"}

    pipeline = SequentialPipeline([build(service)])
    assert (await call(pipeline, mode, x=1)).y == "FB"
    down["now"] = False
    result = await call(pipeline, mode, x=1)
    assert result.y == "real"
    assert "cache_hit" not in [e.kind for e in result.run.events]


def ident(x: int) -> dict[str, int]:
    return {"y": x}


async def test_the_state_name_of_a_renamed_input_wins_whatever_the_order(mode: str) -> None:
    stage = Stage(ident, writes=["y"], inputs={"x": "xs"})
    assert (await call(stage, mode, xs=2, x=1))["y"] == 2
    assert (await call(stage, mode, x=1, xs=2))["y"] == 2
    assert (await call(stage, mode, x=5))["y"] == 5  # its own name, the state name not given
    assert (await call(SequentialPipeline([stage]), mode, xs=2, x=1)).y == 2
    cached = CachedStage(ident, writes=["y"], inputs={"x": "xs"})
    assert [(await call(cached, mode, xs=2, x=1))["y"], (await call(cached, mode, x=1, xs=2))["y"]] == [2, 2]


async def test_a_rename_onto_another_input_of_the_stage_feeds_both(mode: str) -> None:
    def g(a: int, b: int) -> dict[str, str]:
        return {"out": f"{a}|{b}"}

    stage = Stage(g, writes=["out"], inputs={"a": "b"})
    assert stage.ports.required == ("b",)
    assert (await call(stage, mode, b=1))["out"] == "1|1"
    assert (await call(SequentialPipeline([stage]), mode, b=1)).out == "1|1"


def test_outputs_renamed_onto_one_name_are_refused() -> None:
    def h(x: int) -> dict[str, int]:
        return {"p": 1, "q": 2}

    with pytest.raises(ConfigurationError, match="same name") as info:
        Stage(h, writes=["p", "q"], outputs={"p": "q"})
    assert info.value.code == "bad_rename"
    swapped = Stage(h, writes=["p", "q"], outputs={"p": "q", "q": "p"})
    assert dict(swapped(x=1)) == {"q": 1, "p": 2}


async def test_a_retried_stage_around_a_cached_stage_counts_one_miss(mode: str) -> None:
    calls = stageflow.untracked({"n": 0})

    def flaky(x: int) -> dict[str, int]:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("down")
        return {"y": x}

    inner = CachedStage(flaky, writes=["y"])
    outer = Stage(inner, retry=RETRY)
    assert [(await call(outer, mode, x=1))["y"], (await call(outer, mode, x=1))["y"]] == [1, 1]
    assert calls["n"] == 3
    assert (inner.cache_hits, inner.cache_misses) == (1, 1)
