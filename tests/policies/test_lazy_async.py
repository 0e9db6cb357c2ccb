"""A lazy result forced from async code runs its stage's async call on the event loop, exactly once
across threads and tasks. Before, a pipeline's ``acall`` forced a ``LazyStage`` on a worker thread
through the stage's sync call: a module with only ``aforward`` failed there, and an ``async def``
stage ran on stageflow's background loop instead of the caller's. An interrupted forcer leaves no
result behind, and reading a result from where it is being resolved is an error, not a hang."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ForEach, LazyResult, LazyStage, SequentialPipeline, stage
from stageflow.testing import call


class AsyncOnly(dspy.Module):  # type: ignore[misc]
    """A module with ``aforward`` and no ``forward`` (the tutorial's async shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[int] = []

    async def aforward(self, question: str) -> dspy.Prediction:
        self.threads.append(threading.get_ident())
        await asyncio.sleep(0)
        return dspy.Prediction(answer=question.upper())


def _first(q: str) -> dict[str, str]:
    return {"question": q + "?"}


async def test_an_aforward_only_module_runs_lazily_under_acall() -> None:
    module = AsyncOnly()
    pipeline = SequentialPipeline([stage(_first, writes=["question"]), LazyStage(module)])
    result = await pipeline.acall(q="why")
    assert result.answer == "WHY?"
    assert module.threads == [threading.get_ident()]  # (on the caller's loop, not a worker thread)


async def test_avalue_awaits_the_async_call_on_the_loop() -> None:
    module = AsyncOnly()
    pending = LazyStage(module)(question="a")
    assert not pending.done
    assert (await pending.avalue()).answer == "A"
    assert pending.done
    assert module.threads == [threading.get_ident()]
    assert pending.answer == "A"  # (kept: the sync read does not run it again)
    assert len(module.threads) == 1


async def test_an_async_function_stage_is_awaited_on_the_callers_loop(mode: str) -> None:
    seen: list[Any] = []

    async def summarize(question: str) -> dict[str, str]:
        seen.append(asyncio.get_running_loop())
        return {"summary": question * 2}

    pipeline = SequentialPipeline(
        [stage(_first, writes=["question"]), LazyStage(stage(summarize, writes=["summary"]))]
    )
    result = await call(pipeline, mode, q="x")
    assert result.summary == "x?x?"
    if mode == "async":
        assert seen == [asyncio.get_running_loop()]
    else:
        assert seen != [asyncio.get_running_loop()]  # (a sync call runs it on stageflow's own loop)


async def test_a_sync_stage_forced_from_async_code_runs_on_a_worker_thread() -> None:
    threads: list[int] = []

    def slow(x: int) -> dict[str, int]:
        threads.append(threading.get_ident())
        return {"y": x + 1}

    pending = LazyStage(stage(slow, writes=["y"]))(x=1)
    assert (await pending.avalue())["y"] == 2
    assert threads
    assert threads[0] != threading.get_ident()


async def test_exactly_once_across_tasks_and_threads() -> None:
    runs: list[int] = []
    release = asyncio.Event()

    async def once(x: int) -> dict[str, int]:
        runs.append(x)
        await release.wait()
        return {"y": x * 10}

    pending = LazyStage(stage(once, writes=["y"]))(x=4)
    loop = asyncio.get_running_loop()
    tasks = [loop.create_task(pending.avalue()) for _ in range(16)]
    await asyncio.sleep(0.01)  # (one task runs it; the others wait for that run)
    thread_results: list[Any] = []
    threads = [threading.Thread(target=lambda: thread_results.append(pending["y"])) for _ in range(6)]
    for t in threads:
        t.start()
    await asyncio.sleep(0.01)
    assert runs == [4]
    release.set()
    values = await asyncio.gather(*tasks)
    for t in threads:
        await asyncio.to_thread(t.join, 5)
    assert [v["y"] for v in values] == [40] * 16
    assert thread_results == [40] * 6
    assert runs == [4]


async def test_a_cancelled_forcer_leaves_no_result_and_a_waiter_runs_it() -> None:
    runs: list[int] = []
    gate = asyncio.Event()

    async def slow(x: int) -> dict[str, int]:
        runs.append(x)
        if len(runs) == 1:
            await gate.wait()  # (the first run hangs until its forcer is cancelled)
        return {"y": x}

    pending = LazyStage(stage(slow, writes=["y"]))(x=7)
    first = asyncio.get_running_loop().create_task(pending.avalue())
    await asyncio.sleep(0.01)
    waiter = asyncio.get_running_loop().create_task(pending.avalue())
    await asyncio.sleep(0.01)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert (await asyncio.wait_for(waiter, 5))["y"] == 7
    assert runs == [7, 7]  # (the cancelled run was not its result: the waiter ran it again)
    assert pending.done


def test_an_interrupt_in_the_stage_is_not_kept_as_its_result() -> None:
    runs: list[int] = []

    def interrupted_once(x: int) -> dict[str, int]:
        runs.append(x)
        if len(runs) == 1:
            raise KeyboardInterrupt
        return {"y": x}

    pending = LazyStage(stage(interrupted_once, writes=["y"]))(x=3)
    with pytest.raises(KeyboardInterrupt):
        pending.value()
    assert not pending.done
    assert pending["y"] == 3
    assert runs == [3, 3]


def test_an_error_is_kept_and_raised_again_without_running_again() -> None:
    runs: list[int] = []

    async def failing(x: int) -> dict[str, int]:
        runs.append(x)
        raise ValueError("no")

    pending = LazyStage(stage(failing, writes=["y"]))(x=1)
    for _ in range(2):
        with pytest.raises(ValueError, match="no"):
            asyncio.run(pending.avalue())
    with pytest.raises(ValueError, match="no"):
        pending.value()
    assert runs == [1]


async def test_reading_it_synchronously_on_the_loop_resolving_it_is_an_error_not_a_hang() -> None:
    gate = asyncio.Event()

    async def slow(x: int) -> dict[str, int]:
        await gate.wait()
        return {"y": x}

    pending = LazyStage(stage(slow, writes=["y"]))(x=2)
    forcing = asyncio.get_running_loop().create_task(pending.avalue())
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match=r"await it \(`await result.avalue\(\)`\)"):
        pending.value()  # (a sync wait here would block the loop the run needs)
    gate.set()
    assert (await forcing)["y"] == 2


def test_a_stage_reading_its_own_lazy_result_is_an_error_not_a_hang() -> None:
    holder: list[LazyResult] = []
    errors: list[BaseException] = []

    def reads_itself(x: int) -> dict[str, int]:
        try:
            holder[0].value()
        except RuntimeError as e:
            errors.append(e)
        return {"y": x}

    holder.append(LazyStage(stage(reads_itself, writes=["y"]))(x=5))
    started = time.perf_counter()
    assert holder[0]["y"] == 5
    assert time.perf_counter() - started < 5
    assert len(errors) == 1
    assert "would wait for itself" in str(errors[0])


# -- found by helper 102 (session 34) -------------------------------------------------------------


async def test_cancelling_one_waiting_reader_cancels_nobody_else() -> None:
    """(A2/F3) A task waiting for the run was cancelled: the shared future it awaited was cancelled
    with it, the owner failed with ``InvalidStateError`` and the other readers with a cancellation."""
    gate = threading.Event()

    def slow(x: int) -> dict[str, int]:
        gate.wait(5)
        return {"y": x}

    pending = LazyStage(stage(slow, writes=["y"]))(x=2)
    loop = asyncio.get_running_loop()
    owner = loop.create_task(pending.avalue())
    await asyncio.sleep(0.02)
    waiter = loop.create_task(pending.avalue())
    from_thread: list[Any] = []
    reader = threading.Thread(target=lambda: from_thread.append(pending.value()["y"]))
    reader.start()
    await asyncio.sleep(0.02)
    waiter.cancel()
    await asyncio.sleep(0.01)
    gate.set()
    assert (await asyncio.wait_for(owner, 5))["y"] == 2
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await asyncio.to_thread(reader.join, 5)
    assert from_thread == [2]


async def test_an_async_stage_awaiting_its_own_result_is_an_error_not_a_hang() -> None:
    holder: list[LazyResult] = []

    async def reads_itself(x: int) -> dict[str, int]:
        try:
            await holder[0].avalue()
        except RuntimeError as e:
            return {"y": str(e)}
        return {"y": "read"}

    holder.append(LazyStage(stage(reads_itself, writes=["y"]))(x=1))
    value = await asyncio.wait_for(holder[0].avalue(), 5)
    assert "from inside its own run" in value["y"]


@pytest.mark.parametrize("forced_by", ["avalue", "value"])
async def test_a_sync_stage_reading_its_own_result_from_another_thread_is_an_error(forced_by: str) -> None:
    """(F2 b, c) The stage runs on a worker thread (``avalue``), or reads its result from the thread
    of a ``ForEach`` element it started (``value``): not the reader's thread, so not seen before."""
    holder: list[LazyResult] = []

    def element(x: int) -> dict[str, str]:
        try:
            holder[0].value()
        except RuntimeError as e:
            return {"z": str(e)}
        return {"z": "read"}

    inner = ForEach(stage(element, writes=["z"]), over="xs", item="x", collect="zs")

    def reads_itself(x: int) -> dict[str, Any]:
        if forced_by == "value":
            return {"y": inner(xs=[x]).zs[0]}
        try:
            holder[0].value()
        except RuntimeError as e:
            return {"y": str(e)}
        return {"y": "read"}

    holder.append(LazyStage(stage(reads_itself, writes=["y"]))(x=1))
    if forced_by == "avalue":
        value = await asyncio.wait_for(holder[0].avalue(), 5)
    else:
        value = await asyncio.wait_for(asyncio.to_thread(holder[0].value), 5)
    assert "from inside its own run" in value["y"]


def test_a_claim_left_by_a_release_cut_short_is_taken_over() -> None:
    """(F4) A run whose release was interrupted leaves a finished future behind: the next reader
    runs the stage rather than waiting for it (or being told this thread resolves it)."""
    from concurrent.futures import Future

    pending = LazyStage(stage(lambda x: {"y": x}, writes=["y"]))(x=3)
    left: Future[None] = Future()
    left.set_result(None)
    object.__setattr__(pending, "_running", left)
    object.__setattr__(pending, "_owner", (threading.get_ident(), False))
    assert pending["y"] == 3


async def test_a_lazy_stage_around_a_lazy_stage_is_forced_on_the_loop_under_acall() -> None:
    """(F5) The inner result was forced synchronously on the loop (blocking it): read through
    ``hasattr(value, "model_dump")``. Its async stage now runs on the caller's loop."""
    loops: list[Any] = []

    async def inner(x: int) -> dict[str, int]:
        loops.append(asyncio.get_running_loop())
        return {"y": x + 1}

    nested = LazyStage(LazyStage(stage(inner, writes=["y"])))
    result = await SequentialPipeline([stage(lambda q: {"x": q}, writes=["x"]), nested]).acall(q=1)
    assert result.y == 2
    assert loops == [asyncio.get_running_loop()]


async def test_a_single_output_stage_returning_a_lazy_result_gives_its_value(mode: str) -> None:
    """(F5) It stored ``y = {'y': 8}``: the returned lazy result is forced in turn."""
    deferred = LazyStage(stage(lambda x: {"y": x * 2}, writes=["y"]))

    def returns_lazy(x: int) -> Any:
        return deferred(x=x)

    program = SequentialPipeline([LazyStage(stage(returns_lazy, writes=["y"]))])
    assert (await call(program, mode, x=4)).y == 8


def test_a_kept_error_does_not_grow_with_every_read() -> None:
    """(F7) Raising the same exception again appended every reader's frames to its traceback."""

    def failing(x: int) -> dict[str, int]:
        raise ValueError("no")

    pending = LazyStage(stage(failing, writes=["y"]))(x=1)

    def depth() -> int:
        try:
            pending.value()
        except ValueError as e:
            tb, n = e.__traceback__, 0
            while tb is not None:
                tb, n = tb.tb_next, n + 1
            return n
        raise AssertionError("not raised")

    first = depth()
    for _ in range(20):
        depth()
    assert depth() == first


async def test_two_results_reading_each_other_is_an_error_not_a_hang() -> None:
    """(helper 103, F6) A's run reads B, whose run reads A: the runs happen in the contexts the
    results were made in, which lost the reader's markers, and it hung."""
    results: dict[str, LazyResult] = {}

    async def reads(x: str) -> dict[str, str]:
        other = results["b" if x == "a" else "a"]
        try:
            return {"y": str((await other.avalue())["y"])}
        except RuntimeError as e:
            return {"y": str(e)}

    lazy = LazyStage(stage(reads, writes=["y"]))
    results.update(a=lazy(x="a"), b=lazy(x="b"))
    value = await asyncio.wait_for(results["a"].avalue(), 5)
    assert "from inside its own run" in value["y"]


async def test_a_result_made_inside_an_abandoned_run_reads_it_later() -> None:
    """(helper 103, F5) L2 was made inside L1's run, whose reader gave up; reading L2 later (its
    stage reads L1) raised "read from inside its own run": the marker came with L2's context."""
    made: list[LazyResult] = []
    gate = asyncio.Event()

    async def first(x: int) -> dict[str, int]:
        made.append(LazyStage(stage(second, writes=["z"]))(x=x))
        if not gate.is_set():
            await asyncio.sleep(5)  # (the first reader gives up meanwhile)
        return {"y": x}

    async def second(x: int) -> dict[str, int]:
        return {"z": (await l1.avalue())["y"] + 1}

    l1 = LazyStage(stage(first, writes=["y"]))(x=1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(l1.avalue(), 0.05)
    gate.set()
    assert (await asyncio.wait_for(made[0].avalue(), 5))["z"] == 2


def test_readers_a_fan_out_abandoned_start_no_run_of_a_shared_result() -> None:
    """(helper 103, F11) The branches left waiting on a shared lazy result took the run over one
    after another when its owner was refused, each running the stage again."""
    import dspy

    from stageflow.testing import FakeLM

    lm = FakeLM({"y": "ok"}, model="fake/shared-lazy-rerun")
    pred = dspy.Predict("x -> y")
    runs: list[str] = []

    def shared_stage(x: str) -> dict[str, str]:
        runs.append(x)
        time.sleep(0.2)  # (the fan-out ends meanwhile: the call below is refused)
        return {"y": pred(x=x).y}

    with dspy.context(lm=lm):
        shared = LazyStage(stage(shared_stage, writes=["y"]))(x="topic")  # (its call sees this LM)

    def item(x: str) -> dict[str, str]:
        if x == "bad":
            time.sleep(0.05)
            raise ValueError("bad")
        return {"z": shared["y"]}

    program = ForEach(stage(item, writes=["z"]), over="xs", item="x", collect="zs")
    with dspy.context(lm=lm), pytest.raises(stageflow.StageflowError, match="bad"):
        program(xs=["bad", "a", "b", "c"])
    time.sleep(0.6)
    assert runs == ["topic"]
    assert not shared.done
    with dspy.context(lm=lm):
        assert shared["y"] == "ok"  # (the next reader that did not give up runs it)
    assert runs == ["topic", "topic"]


async def test_a_run_that_ended_as_its_reader_was_cancelled_keeps_its_outcome() -> None:
    """(helper 103, F4) The reader was cancelled just as the stage returned: the outcome was thrown
    away, and the next reader ran the stage a second time."""
    runs: list[int] = []
    owner: list[asyncio.Task[Any]] = []

    async def returns(x: int) -> dict[str, int]:
        runs.append(x)
        asyncio.get_running_loop().call_soon(
            owner[0].cancel
        )  # (after this returns, before its reader resumes)
        return {"y": x}

    pending = LazyStage(stage(returns, writes=["y"]))(x=5)
    owner.append(asyncio.get_running_loop().create_task(pending.avalue()))
    with pytest.raises(asyncio.CancelledError):
        await owner[0]
    assert pending.done
    assert (await pending.avalue())["y"] == 5
    assert runs == [5]
