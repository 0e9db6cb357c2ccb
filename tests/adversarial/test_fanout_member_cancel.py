"""A CancelledError a fan-out member raises itself is an interrupt, never a failed item (issue 9).

Reproducer: an ``async`` member raising ``asyncio.CancelledError`` (leaked from an inner task or an
HTTP client) became ``None`` in a ``ForEach`` list, or silently dropped its output from a
``ParallelPipeline``, and the run "succeeded". It now propagates like KeyboardInterrupt does on
the sync path: the siblings are cancelled and ``CancelledError`` leaves the call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import dspy
import pytest

import stageflow
from stageflow.testing import call


class Item(dspy.Module):
    """An async member: ``"boom"`` raises CancelledError, the others take a while."""

    def __init__(self, finished: list[str]) -> None:
        super().__init__()
        self.finished = finished

    def forward(self, item: str) -> dspy.Prediction:
        raise RuntimeError("the sync path is not used: these members run under acall")

    async def aforward(self, item: str) -> dspy.Prediction:
        if item == "boom":
            raise asyncio.CancelledError()
        await asyncio.sleep(0.2)
        self.finished.append(item)
        return dspy.Prediction(out=item.upper())


def _foreach(on_error: Any, finished: list[str]) -> tuple[Any, dict[str, Any]]:
    each = stageflow.ForEach(
        stageflow.Stage(Item(finished), writes=["out"]),
        over="words",
        item="item",
        collect={"out": "outs"},
        on_error=on_error,
    )
    join = stageflow.stage(lambda outs: {"joined": "|".join(map(str, outs))}, writes=["joined"])
    return stageflow.SequentialPipeline([each, join]), {"words": ["a", "boom", "c"]}


def _parallel(on_error: Any, finished: list[str]) -> tuple[Any, dict[str, Any]]:
    group = [
        stageflow.Stage(Item(finished), inputs={"item": "i1"}, outputs={"out": "o1"}),
        stageflow.Stage(Item(finished), inputs={"item": "i2"}, outputs={"out": "o2"}),
    ]
    return stageflow.ParallelPipeline([group], on_error=on_error), {"i1": "a", "i2": "boom"}


def _ensemble(on_error: Any, finished: list[str]) -> tuple[Any, dict[str, Any]]:
    members = [
        stageflow.Stage(Item(finished), outputs={"out": "answer"}),
        stageflow.Stage(Item(finished), inputs={"item": "i2"}, outputs={"out": "answer"}),
    ]
    return stageflow.EnsemblePipeline(members, on_error=on_error), {"item": "a", "i2": "boom"}


BUILDERS: dict[str, Callable[[Any, list[str]], tuple[Any, dict[str, Any]]]] = {
    "ForEach": _foreach,
    "ParallelPipeline": _parallel,
    "EnsemblePipeline": _ensemble,
}


@pytest.mark.parametrize("on_error", ["collect", "skip", "fail_fast"])
@pytest.mark.parametrize("build", BUILDERS.values(), ids=list(BUILDERS))
async def test_a_member_raising_cancelled_error_cancels_the_siblings_and_propagates(
    build: Callable[[Any, list[str]], tuple[Any, dict[str, Any]]], on_error: str
) -> None:
    finished: list[str] = []
    program, inputs = build(on_error, finished)
    with pytest.raises(asyncio.CancelledError):
        await call(program, "async", **inputs)
    await asyncio.sleep(0.3)  # a sibling left running would finish meanwhile
    assert finished == []


async def _leaky(item: str) -> dict[str, str]:
    if item == "boom":
        raise asyncio.CancelledError()
    await asyncio.sleep(0.01)
    return {"out": item.upper()}


@pytest.mark.parametrize("on_error", ["collect", "fail_fast"])
async def test_an_async_function_member_raising_cancelled_error_propagates_in_both_modes(
    on_error: Any, mode: str
) -> None:
    # Sync calls run all-async branches on stageflow's background loop: the cancellation it
    # reports is still an interrupt (asyncio.CancelledError), not a collectable Exception.
    each = stageflow.ForEach(
        stageflow.stage(_leaky, writes=["out"]), over="words", item="item", collect="out", on_error=on_error
    )
    outer = stageflow.ParallelPipeline(
        [[each, stageflow.stage(lambda words: {"n": len(words)}, writes=["n"])]]
    )
    with pytest.raises(asyncio.CancelledError):
        await call(outer, mode, words=["a", "boom", "c"])


async def test_fail_fast_still_cancels_the_siblings_quietly_and_raises_the_first_error() -> None:
    async def work(x: int) -> dict[str, int]:
        if x == 1:
            raise ValueError("bad item")
        await asyncio.sleep(5)
        return {"y": x}

    each = stageflow.ForEach(stageflow.stage(work, writes=["y"]), over="xs", item="x", on_error="fail_fast")
    with pytest.raises(stageflow.StageError, match="bad item"):
        await each.acall(xs=[0, 1, 2])
