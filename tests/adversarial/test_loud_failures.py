"""Failures are loud and interrupts stop (issue 9): each test is the reproducer of one item.

- Ctrl-C (KeyboardInterrupt), SystemExit and cancellation inside a fan-out propagate and stop it;
  they were swallowed and the run "succeeded" with ``None`` in the list.
- A failed item collected by ``on_error="collect"`` inside a nested pipeline is on the outer result
  and in the run's events; the default for ``ForEach`` fails.
- Ensembles keep single-letter answers distinct; ``ErrorHandlingPipeline`` raises one error type;
  parallel branches get private copies; bad values are refused when given.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

import stageflow
from stageflow import (
    ConfigurationError,
    EnsemblePipeline,
    ErrorHandlingPipeline,
    ForEach,
    ParallelPipeline,
    PipelineError,
    ResultAggregator,
    SequentialPipeline,
    StageError,
)
from stageflow.patterns.ensemble import normalize_answer
from stageflow.testing import call

# -- interrupts ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_inside_foreach_propagates_and_stops_the_rest(
    interrupt: type[BaseException], mode: str
) -> None:
    started: list[int] = []
    lock = threading.Lock()

    def work(x: int) -> dict[str, int]:
        with lock:
            started.append(x)
        if x == 2:
            raise interrupt()
        time.sleep(0.01)
        return {"y": x}

    each = ForEach(
        stageflow.stage(work, writes=["y"]), over="xs", item="x", max_concurrency=2, on_error="collect"
    )
    pipeline = SequentialPipeline([each])
    xs = list(range(40))
    # (async: asyncio lets KeyboardInterrupt/SystemExit leave the event loop itself)
    run = (lambda: pipeline(xs=xs)) if mode == "sync" else (lambda: asyncio.run(pipeline.acall(xs=xs)))
    with pytest.raises(interrupt):
        run()
    assert len(started) < 40  # nothing new starts after the interrupt


async def test_cancelling_an_async_fanout_cancels_its_branches() -> None:
    running = asyncio.Event()
    cancelled: list[int] = []

    async def slow(x: int) -> dict[str, int]:
        running.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(x)
            raise
        return {"y": x}

    each = ForEach(stageflow.stage(slow, writes=["y"]), over="xs", item="x")
    task = asyncio.create_task(each.acall(xs=[1, 2, 3]))
    await asyncio.wait_for(running.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(cancelled) == [1, 2, 3]


# -- failed items are never a silent None ------------------------------------------------------------------


def flaky(x: int) -> dict[str, int]:
    if x == 2:
        raise ValueError("bad item 2")
    return {"y": x * 10}


async def test_foreach_fails_by_default(mode: str) -> None:
    pipeline = SequentialPipeline(
        [
            ForEach(stageflow.stage(flaky, writes=["y"]), over="xs", item="x"),
            stageflow.stage(lambda ys: {"s": sum(ys)}, writes=["s"]),
        ]
    )
    with pytest.raises(StageError) as info:
        await call(pipeline, mode, xs=[1, 2, 3])
    assert "bad item 2" in str(info.value)


async def test_collected_failures_inside_a_nested_pipeline_are_on_the_outer_result(mode: str) -> None:
    inner = SequentialPipeline(
        [ForEach(stageflow.stage(flaky, writes=["y"]), over="xs", item="x", on_error="collect")]
    )
    outer = SequentialPipeline([inner])
    result = await call(outer, mode, xs=[1, 2, 3])
    assert result.ys == [10, None, 30]
    errors = result.details["stages[0].stages[0]"]["item_errors"]
    assert len(errors) == 1
    assert "bad item 2" in str(next(iter(errors.values())) if isinstance(errors, dict) else errors[0])
    kinds = [e.kind for e in result.run.events]
    assert "item_failed" in kinds


# -- ensembles, error handling, private copies -------------------------------------------------------------


def test_single_letter_answers_stay_distinct() -> None:
    assert len({normalize_answer(x) for x in ("A", "An", "B")}) == 3


async def test_a_vote_between_letters_is_not_outvoted_by_articles(mode: str) -> None:
    members = [
        stageflow.stage(
            lambda question, a=a: {"answer": a, "confidence": 0.5}, writes=["answer", "confidence"]
        )
        for a in ("A", "An", "B", "B")
    ]
    result = await call(EnsemblePipeline(members, ResultAggregator("majority")), mode, question="q")
    assert result.answer == "B"


async def test_error_handling_raises_the_same_type_with_or_without_outputs(mode: str) -> None:
    def boom(x: int) -> dict[str, int]:
        raise ValueError("boom")

    plain = ErrorHandlingPipeline([stageflow.stage(boom, writes=["y"])])
    with pytest.raises(PipelineError) as a:
        await call(plain, mode, x=1)
    assert type(a.value) is PipelineError


async def test_parallel_branches_get_private_copies_of_mutable_state(mode: str) -> None:
    def add_x(items_in: list[str]) -> dict[str, list[str]]:
        items_in.append("x")
        return {"seen_" + str(len(items_in)): list(items_in)}

    def left(words: list[str]) -> dict[str, list[str]]:
        words.append("x")
        return {"left": list(words)}

    def right(words: list[str]) -> dict[str, list[str]]:
        words.append("x")
        return {"right": list(words)}

    caller = ["foo"]
    p = ParallelPipeline([[stageflow.stage(left, writes=["left"]), stageflow.stage(right, writes=["right"])]])
    result = await call(p, mode, words=caller)
    assert result.left == ["foo", "x"]
    assert result.right == ["foo", "x"]
    assert caller == ["foo"]


# -- bad values are refused when given ----------------------------------------------------------------------


def test_quorum_true_is_refused() -> None:  # (numeric policy values: with the policies' tests)
    with pytest.raises(ConfigurationError, match="quorum"):
        EnsemblePipeline([stageflow.stage(lambda q: {"answer": q}, writes=["answer"])], quorum=True)


async def test_a_non_string_output_key_is_refused_naming_the_stage(mode: str) -> None:
    p = SequentialPipeline([stageflow.stage(lambda x: {1: x})])
    with pytest.raises(StageError) as info:
        await call(p, mode, x=1)
    assert "stages[0]" in str(info.value)
    assert "not a string" in str(info.value)


async def test_a_stage_appended_after_building_runs(mode: str) -> None:
    p = SequentialPipeline([stageflow.stage(lambda x: {"y": x + 1}, writes=["y"])])
    p.stages.append(stageflow.stage(lambda y: {"z": y * 2}, writes=["z"]))
    assert (await call(p, mode, x=1)).z == 4
