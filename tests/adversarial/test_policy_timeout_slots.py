"""Issue 9, TimeoutPolicy: waiting for a pool worker or a concurrency slot is not the stage's run
time, and a sync timeout never waits on the pool its own fan-out occupies. It used to: 3 of 4
instant items timed out on a 2-thread pool, and once abandoned calls filled the pool every later
timed stage "timed out" without running."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import stageflow
from stageflow import ForEach, SequentialPipeline, Stage, StageTimeoutError, stage
from stageflow.engine.concurrency import abandoned_threads
from stageflow.engine.spare import spare_thread_count
from stageflow.testing import call

# Generous limits: these calls take microseconds, so only waiting could ever reach them.
LIMIT = 2.0


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The shared pool has 2 threads for the test (restored afterwards)."""
    before = stageflow.get_config()["max_threads"]
    stageflow.configure(max_threads=2)
    try:
        yield
    finally:
        stageflow.configure(max_threads=before)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An event hung calls wait on; set at teardown so no thread outlives the test."""
    event = threading.Event()
    yield event
    event.set()


def instant(item: int) -> dict[str, int]:
    return {"out": item * 10}


@pytest.mark.usefixtures("two_threads")
async def test_instant_items_under_a_timeout_all_finish_on_a_two_thread_pool(mode: str) -> None:
    each = ForEach(Stage(stage(instant, writes=["out"]), timeout=LIMIT), over="nums", item="item")
    result = await call(each, mode, nums=[1, 2, 3, 4, 5, 6])
    assert result.outs == [10, 20, 30, 40, 50, 60]
    assert result.run.events == []


@pytest.mark.usefixtures("two_threads")
async def test_abandoned_calls_do_not_starve_later_timed_stages(mode: str, gate: threading.Event) -> None:
    def hang(x: int) -> dict[str, int]:
        gate.wait()
        return {"y": x}

    hung = SequentialPipeline([Stage(stage(hang, writes=["y"]), timeout=0.05)])
    before = abandoned_threads()
    for _ in range(3):  # more abandoned calls than the shared pool has threads
        with pytest.raises(StageTimeoutError):
            await call(hung, mode, x=1)
    assert abandoned_threads() == before + 3

    quick = SequentialPipeline([Stage(stage(lambda x: {"y": x + 1}, writes=["y"]), timeout=LIMIT)])
    assert (await call(quick, mode, x=1)).y == 2
    # and the shared pool still serves untimed work
    each = ForEach(stage(instant, writes=["out"]), over="nums", item="item")
    assert (await call(each, mode, nums=[1, 2, 3])).outs == [10, 20, 30]


async def test_waiting_for_a_concurrency_slot_is_not_run_time(mode: str) -> None:
    """``limits(1)`` is held by another call for longer than the timeout; the timed stage waits for
    the slot, then runs in microseconds and succeeds."""
    timeout = 0.25
    held = threading.Event()
    release = threading.Event()

    def holder(x: int) -> dict[str, int]:
        held.set()
        release.wait(10)
        return {"h": x}

    hold = SequentialPipeline([stage(holder, writes=["h"])])
    quick = SequentialPipeline([Stage(stage(lambda x: {"y": x}, writes=["y"]), timeout=timeout)])
    with stageflow.limits(1):
        ctx = contextvars.copy_context()
        worker = threading.Thread(target=ctx.run, args=(hold,), kwargs={"x": 0}, daemon=True)
        worker.start()
        assert held.wait(10)
        threading.Timer(timeout * 4, release.set).start()  # the slot frees well after the timeout
        result = await call(quick, mode, x=7)
    worker.join(10)
    assert release.is_set()  # it really waited for the slot
    assert result.y == 7
    assert result.run.events == []


async def test_the_slot_is_held_until_an_abandoned_call_ends(gate: threading.Event) -> None:
    """A timed-out sync call keeps running; it keeps its concurrency slot until it does."""
    started = threading.Event()

    def hang(x: int) -> dict[str, int]:
        started.set()
        gate.wait()
        return {"y": x}

    hung = SequentialPipeline([Stage(stage(hang, writes=["y"]), timeout=0.05)])
    with stageflow.limits(1) as budget:
        assert budget is not None
        with pytest.raises(StageTimeoutError):
            hung(x=1)
        assert started.is_set()
        assert budget.used == 1  # still running: the cap holds
        gate.set()
        for _ in range(200):
            if budget.used == 0:
                break
            await asyncio.sleep(0.01)
        assert budget.used == 0


async def test_a_timeout_error_raised_by_the_stage_is_not_a_stage_timeout(mode: str) -> None:
    def raises(x: int) -> dict[str, Any]:
        raise TimeoutError("the stage's own socket timeout")

    p = SequentialPipeline([Stage(stage(raises, writes=["y"]), timeout=LIMIT)])
    with pytest.raises(stageflow.StageError) as info:
        await call(p, mode, x=1)
    assert not isinstance(info.value, StageTimeoutError)
    assert isinstance(info.value.__cause__, TimeoutError)
    assert "socket timeout" in str(info.value)


def test_spare_threads_go_away_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    from stageflow.engine import spare

    monkeypatch.setattr(spare, "IDLE_SECONDS", 0.05)
    p = SequentialPipeline([Stage(stage(lambda x: {"y": x}, writes=["y"]), timeout=LIMIT)])
    assert p(x=1).y == 1
    assert spare_thread_count() >= 1
    deadline = threading.Event()
    for _ in range(int((spare.IDLE_SECONDS + 3) / 0.05)):
        if spare_thread_count() == 0:
            break
        deadline.wait(0.05)
    assert spare_thread_count() == 0


@pytest.mark.parametrize("async_stream", [False, True], ids=["sync-stream", "async-stream"])
@pytest.mark.parametrize("async_program", [False, True], ids=["sync-program", "async-program"])
def test_a_timed_predictor_streams_under_streamify(async_program: bool, async_stream: bool) -> None:
    """The spare thread of a timed call holds the stream's AnyIO token, as pool threads do."""
    import dspy
    from dspy.streaming import StreamListener, StreamResponse

    from stageflow.testing import FakeLM

    program = SequentialPipeline([Stage(dspy.Predict("question -> answer"), timeout=LIMIT)])
    streamer = dspy.streamify(
        program,
        stream_listeners=[StreamListener(signature_field_name="answer")],
        is_async_program=async_program,
        async_streaming=async_stream,
    )
    with dspy.context(lm=FakeLM({"answer": "a long answer text"}, stream_chunk=4)):
        if async_stream:

            async def collect() -> list[Any]:
                return [x async for x in streamer(question="q")]

            items = asyncio.run(collect())
        else:
            items = list(streamer(question="q"))
    assert items[-1].answer == "a long answer text"
    chunks = [x.chunk for x in items if isinstance(x, StreamResponse)]
    assert len(chunks) > 1
    assert "".join(chunks) == "a long answer text"
