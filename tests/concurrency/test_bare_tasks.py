"""Bare fan-outs: a ForEach of plain function stages runs each element as a bare task (``async def``
stages) or on threads that share one run (plain ``def`` stages) (issue 12, wide fan-outs), and
everything a user can see is what the general fan-out path gives.

Each scenario runs twice: once on the bare path and once forced onto the general path (a
``timeout`` no element reaches makes a fan-out ineligible), for both kinds of stage, called sync and
async, and compares results, trace (paths, order, success flags), stage outputs, item results,
errors and usage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ForEach, StageError
from stageflow.engine import bare
from stageflow.patterns import _fanout
from stageflow.testing import FakeLM, call


@pytest.fixture
def bare_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many fan-outs took the bare path (and with how many branches)."""
    seen: list[int] = []
    real = bare.bare_ready

    def counted(entries: Any, *rest: Any, **kw: Any) -> bool:
        ready = real(entries, *rest, **kw)
        if ready:
            seen.append(len(entries))
        return ready

    monkeypatch.setattr(_fanout, "bare_ready", counted)
    return seen


def _each(fn: Any, general: bool, **options: Any) -> ForEach:
    if general:
        options["timeout"] = 60.0  # never reached; a timeout rules out bare tasks
    return ForEach(stageflow.stage(fn, writes=["y"]), over="xs", item="x", collect="ys", **options)


def _seen(result: Any) -> dict[str, Any]:
    """What a user can read from a ForEach result (elapsed times aside)."""
    return {
        "ys": result.ys,
        "trace": [(r.path, r.ok) for r in result.run.trace],
        "outputs": list(result.stage_outputs.items()),
        "items": [(r["index"], r["status"], repr(r["error"])) for r in result.item_results],
        "errors": [(e["index"], e["status"], repr(e["error"])) for e in result.item_errors],
        "events": [(e.stage, e.kind) for e in result.run.events],
    }


def _bare(mode: str, fn: Any) -> bool:
    """Whether a ForEach of ``fn`` called in ``mode`` takes a bare path: ``async def`` stages do in
    either mode, and so do plain ``def`` stages (on threads; under ``acall`` the whole thread fan-out
    is awaited), unless they are marked ``blocking=False`` (then ``acall`` runs them inline)."""
    return asyncio.iscoroutinefunction(fn) or mode == "sync" or getattr(fn, "blocking", True)


async def _both(mode: str, fn: Any, bare_calls: list[int], **options: Any) -> tuple[Any, Any]:
    xs = options.pop("xs")
    general = await call(_each(fn, True, **options), mode, xs=xs)
    assert bare_calls == []
    fast = await call(_each(fn, False, **options), mode, xs=xs)
    assert bare_calls == ([len(xs)] if _bare(mode, fn) else [])
    return fast, general


@pytest.fixture(params=["async def", "def"])
def kind(request: pytest.FixtureRequest) -> str:
    """The kind of function stage: ``async def`` (bare tasks) or ``def`` (threads sharing one run)."""
    return str(request.param)


def _stage_fn(kind: str, work: Callable[[int], Any], delay: Callable[[int], float] = lambda x: 0.0) -> Any:
    """``work`` as a stage function of ``kind`` that waits ``delay(x)`` seconds first."""
    if kind == "def":

        def sync_fn(x: int) -> Any:
            time.sleep(delay(x))
            return work(x)

        return sync_fn

    async def async_fn(x: int) -> Any:
        await asyncio.sleep(delay(x))
        return work(x)

    return async_fn


def _doubled(x: int) -> dict[str, int]:
    return {"y": 2 * x}


def _later_first(x: int) -> float:
    return 0.002 * (5 - x % 5)  # later elements finish first


async def test_results_trace_and_outputs_match_the_general_path(
    mode: str, kind: str, bare_calls: list[int]
) -> None:
    fn = _stage_fn(kind, _doubled, _later_first)
    fast, general = await _both(mode, fn, bare_calls, xs=list(range(12)))
    assert fast.ys == [2 * x for x in range(12)]
    assert [r.path for r in fast.run.trace] == [f"stage[{i}]" for i in range(12)]  # input order
    assert list(fast.stage_outputs) == [f"stage[{i}]" for i in range(12)]
    assert _seen(fast) == _seen(general)


def _picky(x: int) -> dict[str, int]:
    if x % 3 == 1:
        raise ValueError(f"no {x}")
    return {"y": x}


@pytest.mark.parametrize("on_error", ["collect", "skip"])
async def test_failed_elements_match_the_general_path(
    mode: str, kind: str, bare_calls: list[int], on_error: str
) -> None:
    fn = _stage_fn(kind, _picky, _later_first)
    fast, general = await _both(mode, fn, bare_calls, xs=list(range(7)), on_error=on_error)
    assert [e["index"] for e in fast.item_errors] == [1, 4]
    assert all(isinstance(e["error"], StageError) for e in fast.item_errors)
    assert "no 4" in str(fast.item_errors[1]["error"])
    assert ("stage[4]", False) in [(r.path, r.ok) for r in fast.run.trace]
    assert _seen(fast) == _seen(general)


async def test_fail_fast_raises_the_first_error_and_stops_the_rest(
    mode: str, kind: str, bare_calls: list[int]
) -> None:
    finished: list[int] = []

    def slow_or_fail(x: int) -> dict[str, int]:
        if x == 2:
            raise ValueError("element two")
        finished.append(x)
        return {"y": x}

    fn = _stage_fn(kind, slow_or_fail, lambda x: 0.0 if x == 2 else 0.3)
    for general in (True, False):
        with pytest.raises(StageError, match=r"stage\[2\].*element two") as caught:
            await call(_each(fn, general), mode, xs=list(range(6)))
        assert caught.value.stage_path == "stage[2]"
        if kind == "async def":
            await asyncio.sleep(0.4)
            assert finished == []  # the other elements were cancelled (threads cannot be)
    assert bare_calls == ([6] if _bare(mode, fn) else [])


async def test_an_output_that_cannot_merge_fails_its_element_only(
    mode: str, kind: str, bare_calls: list[int]
) -> None:
    fn = _stage_fn(kind, lambda x: {"y": x} if x == 0 else {"z": x})  # "y" is missing
    fast, general = await _both(mode, fn, bare_calls, xs=[0, 1, 2], on_error="collect")
    assert [e["index"] for e in fast.item_errors] == [1, 2]
    assert _seen(fast) == _seen(general)


async def test_a_cancelled_error_raised_by_an_element_leaves_the_call(
    mode: str, bare_calls: list[int]
) -> None:
    async def leaks(x: int) -> dict[str, int]:
        await asyncio.sleep(0)
        if x == 1:
            raise asyncio.CancelledError()
        await asyncio.sleep(5)
        return {"y": x}

    with pytest.raises(asyncio.CancelledError):
        await call(_each(leaks, False, on_error="collect"), mode, xs=[0, 1, 2])
    assert bare_calls == [3]


@pytest.mark.parametrize("general", [False, True], ids=["bare", "general"])
async def test_cancelling_the_caller_cancels_every_element_and_waits_for_it(
    bare_calls: list[int], general: bool
) -> None:
    started: list[int] = []
    finished: list[int] = []
    cleaned: list[int] = []

    async def wait(x: int) -> dict[str, int]:
        started.append(x)
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # an element's own clean-up, awaited
            cleaned.append(x)
            raise
        finished.append(x)
        return {"y": x}

    task = asyncio.ensure_future(_each(wait, general).acall(xs=list(range(5))))
    while len(started) < 5:
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sorted(cleaned) == [0, 1, 2, 3, 4]  # the caller resumes after every clean-up, as with gather
    await asyncio.sleep(0.3)
    assert finished == []
    assert bare_calls == ([] if general else [5])


async def test_lm_usage_is_attributed_to_each_element(mode: str, kind: str, bare_calls: list[int]) -> None:
    predict = dspy.Predict("question -> answer")

    async def aask(x: int) -> dict[str, str]:
        return {"y": (await predict.acall(question=f"q{x}")).answer}

    def ask(x: int) -> dict[str, str]:
        return {"y": predict(question=f"q{x}").answer}

    with dspy.context(lm=FakeLM({"answer": "ok"})):
        fast, general = await _both(mode, aask if kind == "async def" else ask, bare_calls, xs=[0, 1, 2])
    assert fast.ys == ["ok"] * 3
    by_path = {path: fast.run.usage[path].lm_calls for path in fast.run.usage.paths()}
    assert by_path == {f"stage[{i}]": 1 for i in range(3)}
    assert by_path == {path: general.run.usage[path].lm_calls for path in general.run.usage.paths()}


async def test_hooks_a_cap_or_a_policy_take_the_general_path(
    mode: str, kind: str, bare_calls: list[int]
) -> None:
    xs = list(range(4))
    _double = _stage_fn(kind, _doubled)
    await call(_each(_double, False, max_concurrency=2), mode, xs=xs)
    with stageflow.limits(8):
        await call(_each(_double, False), mode, xs=xs)
    retried = ForEach(
        stageflow.Stage(stageflow.stage(_double, writes=["y"]), retry=2), over="xs", item="x", collect="ys"
    )
    await call(retried, mode, xs=xs)
    with stageflow.trace():
        await call(_each(_double, False), mode, xs=xs)
    assert bare_calls == []
    await call(_each(_double, False, max_concurrency=4), mode, xs=xs)  # a cap no element can reach
    assert bare_calls == ([4] if _bare(mode, _double) else [])


async def test_fail_fast_stops_sync_stages_from_starting_under_acall(bare_calls: list[int]) -> None:
    """Reproducer (issue 12 verification): under ``acall`` a fail-fast ForEach of ``def`` stages
    started 924 of 1,000 elements after element 0 had failed; a sync call started 1."""
    started: list[int] = []

    def work(x: int) -> dict[str, int]:
        started.append(x)
        if x == 0:
            raise ValueError("element zero")
        time.sleep(0.05)
        return {"y": x}

    each = ForEach(stageflow.stage(work, writes=["y"]), over="xs", item="x", collect="ys")
    with pytest.raises(StageError, match="element zero"):
        await each.acall(xs=list(range(400)))
    assert bare_calls == [400]
    assert len(started) < 100  # those already taken by a thread when element 0 failed; not all


async def test_cancelling_an_acall_of_sync_stages_starts_no_more(bare_calls: list[int]) -> None:
    started: list[int] = []

    def work(x: int) -> dict[str, int]:
        started.append(x)
        time.sleep(0.05)
        return {"y": x}

    each = ForEach(stageflow.stage(work, writes=["y"]), over="xs", item="x", collect="ys", max_concurrency=2)
    task = asyncio.ensure_future(each.acall(xs=list(range(40))))
    await asyncio.sleep(0.12)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.2)
    settled = len(started)
    await asyncio.sleep(0.2)
    assert len(started) == settled < 40  # nothing new starts after the cancel


def test_a_thread_fan_out_stopped_from_outside_starts_nothing_more() -> None:
    """What a cancelled ``acall`` of ``def`` stages does to its thread fan-out: once stopped, no
    branch starts (here it is stopped before any could)."""
    from stageflow.engine.fanout import fan_out

    ran: list[int] = []
    outcomes = fan_out([lambda i=i: ran.append(i) for i in range(50)], on_start=lambda stop: stop())
    assert ran == []
    assert {o.status for o in outcomes} == {"skipped"}


def _inner_item(z: int) -> dict[str, int]:
    if z < 0:
        raise ValueError(f"inner {z}")  # (an item_failed event of the inner ForEach)
    return {"w": z}


_INNER = stageflow.SequentialPipeline(
    [
        stageflow.stage(lambda z: {"y": z * 10, "zs": [z, -1 - z]}, writes=["y", "zs"]),
        ForEach(  # (a timeout keeps it on the general path: the bare fan-outs counted are the outer ones)
            stageflow.stage(_inner_item, writes=["w"]),
            over="zs",
            item="z",
            collect="ws",
            on_error="collect",
            timeout=60.0,
        ),
    ]
)


async def test_elements_returning_a_pipelines_result_match_the_general_path(
    mode: str, kind: str, bare_calls: list[int]
) -> None:
    # The returned result joins its run to the element's: its records follow the element's own in
    # input order, and its outputs, details and events are kept in input order (outputs were dropped
    # on the shared run, details and events came in the order the elements finished).
    fn = _stage_fn(kind, lambda x: _INNER(z=x), _later_first)
    fast, general = await _both(mode, fn, bare_calls, xs=list(range(6)))
    assert fast.ys == [10 * x for x in range(6)]
    assert [r.path for r in fast.run.trace][:2] == ["stage[0]", "stage[0].stages[0]"]
    assert "stage[5].stages[0]" in fast.stage_outputs
    assert _seen(fast) == _seen(general)
    assert list(fast.run.details) == list(general.run.details)
    assert [str(e.error)[-8:] for e in fast.run.events] == [f"inner -{x + 1}" for x in range(6)]


@pytest.mark.parametrize("how", ["sync", "asyncio.run"])
def test_a_system_exit_names_the_element_it_left(how: str, kind: str, bare_calls: list[int]) -> None:
    # (A SystemExit leaves an event loop from the task that raised it, so the async call runs in a
    # loop of its own here, as asyncio.run does.)
    def leave(x: int) -> dict[str, int]:
        if x == 2:
            raise SystemExit(3)
        return {"y": x}

    fn = _stage_fn(kind, leave)
    for general in (True, False):
        pipeline = _each(fn, general)

        def run(pipeline: ForEach = pipeline) -> Any:
            if how == "sync":
                return pipeline(xs=list(range(4)))
            return asyncio.run(pipeline.acall(xs=list(range(4))))

        with pytest.raises(SystemExit) as caught:
            run()
        assert caught.value.stage_path == "stage[2]"  # type: ignore[attr-defined]
    assert bare_calls == ([4] if _bare("sync" if how == "sync" else "async", fn) else [])
