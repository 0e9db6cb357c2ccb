"""A pipeline call leaves no reference cycle behind: what it made is freed by reference counting
as soon as the caller drops the result, not kept (with every branch's state and LM output) until a
full collection finds it. Before, a sync fan-out's stop signal kept the fan-out in a cycle (the
signal held the fan-out's ``stop``; the fan-out held the signal): ~10 objects per branch, for 512
branches a 23 ms full collection every dozen calls."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import stageflow
from stageflow import EnsemblePipeline, ForEach, ParallelPipeline, ResultAggregator, SequentialPipeline, stage


def _double(x: int) -> dict[str, int]:
    return {"y": x * 2}


async def _adouble(x: int) -> dict[str, int]:
    return {"y": x * 2}


def _fan_outs() -> dict[str, Callable[[], Any]]:
    def each(fn: Any, **options: Any) -> ForEach:
        return ForEach(stage(fn, writes=["y"]), over="xs", item="x", collect="ys", **options)

    return {
        "ForEach, fail_fast (default)": lambda: each(_double),
        "ForEach, collect": lambda: each(_double, on_error="collect"),
        "ForEach, max_concurrency=2": lambda: each(_double, max_concurrency=2),
        "ForEach, timeout": lambda: each(_double, timeout=30.0),
        "EnsemblePipeline, quorum (until)": lambda: SequentialPipeline(
            [
                stage(lambda xs: {"x": len(xs)}, writes=["x"], name="size"),
                EnsemblePipeline(
                    [stage(_double, writes=["y"], name=f"m{i}") for i in range(3)],
                    ResultAggregator("majority", field="y"),
                    quorum=2,
                ),
            ]
        ),
        "ForEach, async stage": lambda: each(_adouble),
        "ParallelPipeline": lambda: SequentialPipeline(
            [
                stage(lambda xs: {"x": len(xs)}, writes=["x"], name="size"),
                ParallelPipeline(
                    [
                        stage(_double, writes=["y"], name="a"),
                        stage(lambda x: {"z": x}, writes=["z"], name="b"),
                    ]
                ),
            ]
        ),
    }


def _garbage_of(call: Callable[[], Any]) -> collections.Counter[str]:
    """The objects ``call`` left in reference cycles, by type (the collector off meanwhile)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        result = call()
        del result
        gc.collect()
        return collections.Counter(type(o).__name__ for o in gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        if enabled:
            gc.enable()


def _own_garbage(call: Callable[[], Any]) -> collections.Counter[str]:
    """What ``call`` itself leaves in reference cycles: the least of up to three calls. A cycle
    the call makes recurs on every call; garbage it does not make does not (a thread an earlier
    test left running drops what it held mid-call: seen once in CI, a dropped Signature class)."""
    garbage = _garbage_of(call)
    for _ in range(2):
        if not garbage:
            break
        garbage = min(garbage, _garbage_of(call), key=lambda g: sum(g.values()))
    return garbage


def _awaited_garbage(
    program: Any, inputs: dict[str, Any], check: Callable[[Any], None] = lambda result: None
) -> collections.Counter[str]:
    """What ``await program.acall(**inputs)`` leaves in reference cycles, on a loop of its own,
    after three calls (each result given to ``check``) that build the plans and caches that live
    on."""
    loop = asyncio.new_event_loop()

    def call() -> Any:
        return loop.run_until_complete(program.acall(**inputs))

    try:
        for _ in range(3):
            check(call())
        return _own_garbage(call)
    finally:
        loop.close()


@pytest.mark.parametrize("name", list(_fan_outs()))
def test_a_fan_out_call_leaves_no_reference_cycle(name: str, mode: str) -> None:
    program = _fan_outs()[name]()
    loop = asyncio.new_event_loop()

    def call() -> Any:
        return loop.run_until_complete(stageflow.testing.call(program, mode, xs=list(range(64))))

    try:
        for _ in range(3):  # (first calls build plans and caches that live on)
            out = call()
            assert out.get("ys", [0, 2])[:2] == [0, 2]
            assert out.get("y", 0) in (0, 128)
        garbage = _own_garbage(call)
    finally:
        loop.close()
    assert not garbage, f"{name} ({mode}) left objects in reference cycles: {dict(garbage.most_common(8))}"


def test_the_sweep_sees_a_cycle_when_there_is_one() -> None:
    """The check above can fail: a stage that builds a cycle is seen."""

    class Node:
        def __init__(self) -> None:
            self.me = self

    def cyclic(x: int) -> dict[str, int]:
        Node()
        return {"y": x}

    program = ForEach(stage(cyclic, writes=["y"]), over="xs", item="x", collect="ys")
    program(xs=[1])
    garbage = _garbage_of(lambda: program(xs=[1, 2, 3]))
    assert garbage["Node"] == 3


def _boom(x: int) -> dict[str, int]:
    raise ValueError("no")


def _failing_programs() -> dict[str, Callable[[], Any]]:
    def nested(depth: int) -> Any:
        program: Any = SequentialPipeline([stage(_boom, writes=["y"])])
        for _ in range(depth - 1):
            program = SequentialPipeline([program])
        return program

    return {
        "a stage raises": lambda: nested(1),
        "a stage raises, three pipelines deep": lambda: nested(3),
        "an ErrorHandlingPipeline leaves it unrecovered": lambda: stageflow.ErrorHandlingPipeline(
            [stage(_boom, writes=["y"])]
        ),
    }


def _swallowed(program: Any, mode: str, loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Call ``program``, dropping its error where it is caught (in the coroutine for ``acall``: a
    task that ends with an exception keeps it, which is asyncio's, not the engine's)."""

    async def acall() -> None:
        with contextlib.suppress(stageflow.StageflowError):
            await program.acall(x=1)

    def call() -> None:
        with contextlib.suppress(stageflow.StageflowError):
            program(x=1)

    return call if mode == "sync" else lambda: loop.run_until_complete(acall())


@pytest.mark.parametrize("traced", [False, True])
@pytest.mark.parametrize("name", list(_failing_programs()))
def test_a_failed_call_leaves_no_reference_cycle(name: str, traced: bool, mode: str) -> None:
    """(helper 100, R1) The engine raised a stage's error from a frame whose local held it: error →
    traceback → frame → error, a cycle that kept the run and its whole state until a collection."""
    program = _failing_programs()[name]()
    loop = asyncio.new_event_loop()
    run = _swallowed(program, mode, loop)

    def call() -> None:
        if traced:
            with stageflow.profile(), stageflow.trace():
                run()
        else:
            run()

    try:
        for _ in range(3):
            call()
        garbage = _own_garbage(call)
    finally:
        loop.close()
    assert not garbage, f"{name} ({mode}) left objects in reference cycles: {dict(garbage.most_common(8))}"


def test_a_budget_refusal_a_stage_skips_leaves_no_reference_cycle() -> None:
    """(helper 100, R8) The ledger raised ``BudgetExceeded`` from a frame whose local held it."""
    import dspy

    from stageflow.testing import FakeLM

    lm = FakeLM({"y": "ok"}, model="fake/budget-cycle")
    program = SequentialPipeline(
        [
            dspy.Predict("x -> y"),
            stageflow.Stage(dspy.Predict("y -> z"), skip_on=[stageflow.BudgetExceeded]),
        ]
    )

    def call() -> Any:
        with dspy.context(lm=lm), stageflow.budget(max_calls=1):
            return program(x="q")

    for _ in range(3):
        assert call().y == "ok"
    garbage = _own_garbage(call)
    assert not garbage, f"left objects in reference cycles: {dict(garbage.most_common(8))}"


def test_the_fast_paths_value_parsers_are_freed_without_the_collector() -> None:
    """A parser kept its branch as a bound method of itself: every LM signature plan dropped (a
    signature changed, a cache cleared) waited for a collection, and one that came during a
    measured call showed up as that call's garbage."""
    import enum
    from typing import Literal, Optional

    from stageflow.lm.fast._values import ValueParser

    class Color(enum.Enum):
        RED = "red"

    def parse_all() -> list[Any]:
        kinds: list[tuple[Any, str]] = [
            (str, "a"),
            (int, "1"),
            (Color, "red"),
            (Literal["yes", "no"], "'yes'"),
            (Optional[str], "x"),  # noqa: UP045  (the Optional spelling takes its own branch)
        ]
        return [ValueParser(annotation)(text) for annotation, text in kinds]

    assert parse_all() == ["a", 1, Color.RED, "yes", "x"]
    garbage = _garbage_of(parse_all)
    assert not garbage, dict(garbage)


def test_garbage_from_elsewhere_during_one_call_is_not_the_calls() -> None:
    """(CI, 444541b) The first measured call saw a Signature class another thread dropped. The
    check calls again, and still fails on a cycle every call makes."""
    import dspy

    held = [dspy.Signature("q -> a")]
    calls = 0

    def call() -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            held.clear()  # garbage this call did not make: the class and its cycles

    assert _own_garbage(call) == collections.Counter()
    assert calls == 2

    class Loop:
        def __init__(self) -> None:
            self.me = self

    assert _own_garbage(lambda: Loop())["Loop"] == 1


def _odd_fails(x: int) -> dict[str, int]:
    if x % 2:
        raise ValueError(f"item {x}")
    return {"y": 2 * x}


async def _aodd_fails(x: int) -> dict[str, int]:
    return _odd_fails(x)


@pytest.mark.parametrize("options", [{}, {"max_concurrency": 2}], ids=["bare tasks", "general path"])
@pytest.mark.parametrize("on_error", ["collect", "skip"])
def test_an_awaited_fan_out_that_keeps_its_errors_leaves_no_reference_cycle(
    on_error: str, options: dict[str, Any]
) -> None:
    """(benchmarks/cycles.py, twenty-first pass) Every failed branch of an awaited fan-out of async
    function stages left ~35 objects in cycles (``asyncio.gather(return_exceptions=True)``: none):
    the error, re-raised in the fan-out's done callback, took that frame into its traceback, and the
    branch's stage error was raised and caught there too; those frames reach the fan-out's lists,
    which keep the errors."""
    program = ForEach(
        stage(_aodd_fails, writes=["y"]), over="xs", item="x", collect="ys", on_error=on_error, **options
    )
    garbage = _awaited_garbage(program, {"xs": list(range(64))})
    assert not garbage, f"{on_error}: left objects in reference cycles: {dict(garbage.most_common(8))}"


@pytest.mark.parametrize("options", [{}, {"max_concurrency": 2}], ids=["bare tasks", "general path"])
def test_a_kept_branch_error_still_shows_where_the_stage_failed(options: dict[str, Any]) -> None:
    """What the cycle fix takes out of the tracebacks is the engine's callback frames only: the
    stage's error (the collected error's cause) still shows the stage's own line."""
    import traceback

    program = ForEach(
        stage(_aodd_fails, writes=["y"]), over="xs", item="x", collect="ys", on_error="collect", **options
    )
    result = asyncio.run(program.acall(xs=[0, 1]))
    errors = [row["error"] for row in result.item_errors]
    assert len(errors) == 1
    error = errors[0]
    assert isinstance(error, stageflow.StageError)
    cause = error.__cause__
    assert isinstance(cause, ValueError)
    assert str(cause) == "item 1"
    text = "".join(traceback.format_exception(error))
    assert 'raise ValueError(f"item {x}")' in text
    assert "_aodd_fails" in text
    tb = cause.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_frame.f_code.co_name == "_odd_fails"
    assert tb.tb_frame.f_locals == {"x": 1}  # (your frames keep their locals, for a post-mortem)


class _QuotaError(stageflow.StageflowError):
    """An error of yours that is a StageflowError: the engine passes it on as it is."""


async def _over_quota(x: int) -> dict[str, int]:
    limit = 10
    if x % 2:
        raise _QuotaError(f"item {x} over {limit}")
    return {"y": x}


def _stage_frames(error: BaseException) -> list[tuple[str, list[str]]]:
    out = []
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_over_quota":
            out.append((tb.tb_frame.f_code.co_name, sorted(tb.tb_frame.f_locals)))
        tb = tb.tb_next
    return out


@pytest.mark.parametrize("options", [{}, {"max_concurrency": 2}], ids=["bare tasks", "general path"])
@pytest.mark.parametrize("on_error", ["collect", "fail_fast"])
def test_a_stageflow_error_of_yours_keeps_its_own_traceback(on_error: str, options: dict[str, Any]) -> None:
    """(helper 112, finding 2) The cycle fix took the whole traceback off the error a failed branch
    keeps, meant for the stage error the engine makes; a StageflowError of yours, passed on as it
    is, lost your frames too (no post-mortem), on the bare path only."""
    program = ForEach(
        stage(_over_quota, writes=["y"]), over="xs", item="x", collect="ys", on_error=on_error, **options
    )
    if on_error == "collect":
        error = asyncio.run(program.acall(xs=[0, 1])).item_errors[0]["error"]
    else:
        with pytest.raises(_QuotaError) as raised:
            asyncio.run(program.acall(xs=[0, 1]))
        error = raised.value
    assert isinstance(error, _QuotaError)
    assert _stage_frames(error) == [("_over_quota", ["limit", "x"])]


@pytest.mark.parametrize("options", [{}, {"max_concurrency": 2}], ids=["bare tasks", "general path"])
def test_a_kept_stageflow_error_of_yours_leaves_no_reference_cycle(options: dict[str, Any]) -> None:
    program = ForEach(
        stage(_over_quota, writes=["y"]), over="xs", item="x", collect="ys", on_error="collect", **options
    )
    garbage = _awaited_garbage(program, {"xs": list(range(64))})
    assert not garbage, f"left objects in reference cycles: {dict(garbage.most_common(8))}"


async def _undeclared_output(x: int) -> dict[str, int]:
    return {"z": x} if x % 2 else {"y": x}


def test_a_branch_whose_outputs_do_not_merge_leaves_no_reference_cycle() -> None:
    """(helper 112, finding 4) A branch that fails when its outputs are merged (not when it runs)
    failed in the bare path's done callback, whose frame the error's traceback held: 197 objects in
    cycles per call, the result included."""
    program = ForEach(
        stage(_undeclared_output, writes=["y"]), over="xs", item="x", collect="ys", on_error="collect"
    )

    def check(result: Any) -> None:
        errors = [row["error"] for row in result.item_errors]
        assert len(errors) == 8
        assert all(isinstance(e, stageflow.ContractError) for e in errors)
        assert "declares output 'y' but did not return it" in str(errors[0])

    garbage = _awaited_garbage(program, {"xs": list(range(16))}, check)
    assert not garbage, f"left objects in reference cycles: {dict(garbage.most_common(8))}"


def _member(answer: str | None, wait: float) -> Any:
    async def member(q: str) -> dict[str, Any]:
        if answer is None:
            raise RuntimeError("down")
        await asyncio.sleep(wait)
        return {"answer": answer, "confidence": 0.9}

    return stage(member, writes=["answer", "confidence"], name=f"m_{answer}_{wait}")


@pytest.mark.parametrize("failing", [False, True], ids=["no member fails", "one member fails"])
def test_an_awaited_quorum_leaves_no_reference_cycle(failing: bool) -> None:
    """(helper 112, finding 3) An ensemble that stops at its quorum cancels the members still
    running; each cancelled branch's frame kept its task, which keeps the cancellation, whose
    traceback keeps the frame: 95–113 objects in cycles per call."""
    members = [_member("a", 0.001), _member("a", 0.001), _member("b", 0.5)]
    if failing:
        members.insert(0, _member(None, 0.0))
    program = EnsemblePipeline(members, ResultAggregator("majority", field="answer"), quorum=2)

    def check(result: Any) -> None:
        assert result.answer == "a"

    garbage = _awaited_garbage(program, {"q": "?"}, check)
    assert not garbage, f"left objects in reference cycles: {dict(garbage.most_common(8))}"


def _fails_on_pool_threads(x: int) -> dict[str, int]:
    time.sleep(0.001)
    if x % 2 and threading.current_thread() is not threading.main_thread():
        raise ValueError(f"item {x}")
    return {"y": 2 * x}


@pytest.mark.parametrize("options", [{}, {"max_concurrency": 4}], ids=["bare", "general path"])
@pytest.mark.parametrize("on_error", ["collect", "skip"])
def test_a_sync_fan_out_keeping_errors_from_pool_threads_leaves_no_reference_cycle(
    on_error: str, options: dict[str, Any]
) -> None:
    """(helper 113, P2) A branch error a sync fan-out keeps linked, through its frames, back to the
    pool thread's puller frames, which held the fan-out, whose outcomes hold the error: every
    branch's value stayed alive until a collection (512 sleeping branches: 14,139 objects in
    cycles). Errors of branches the calling thread runs itself still link to its own frames, as a
    list of errors kept in a loop does in any Python code: those branches do not fail here."""
    program = ForEach(
        stage(_fails_on_pool_threads, writes=["y"]),
        over="xs",
        item="x",
        collect="ys",
        on_error=on_error,
        **options,
    )

    def check(result: Any) -> None:
        assert result.item_errors, "no branch failed on a pool thread: the check would be vacuous"

    for _ in range(2):
        check(program(xs=list(range(32))))
    garbage = _own_garbage(lambda: check(program(xs=list(range(32)))))
    assert not garbage, f"left objects in reference cycles: {dict(garbage.most_common(8))}"


def test_a_kept_sync_branch_error_still_shows_where_the_stage_failed() -> None:
    import traceback

    program = ForEach(
        stage(_fails_on_pool_threads, writes=["y"]), over="xs", item="x", collect="ys", on_error="collect"
    )
    errors = [row["error"] for row in program(xs=list(range(16))).item_errors]
    assert errors
    text = "".join(traceback.format_exception(errors[0]))
    assert 'raise ValueError(f"item {x}")' in text
    assert "_fails_on_pool_threads" in text


@pytest.mark.parametrize(
    "options",
    [{"timeout": 30.0, "on_error": "collect"}, {"on_error": "fail_fast"}],
    ids=["timeout (spare threads)", "fail_fast (raised)"],
)
def test_a_sync_fan_outs_errors_kept_or_raised_leave_no_reference_cycle(
    options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """(helper 115) A fan-out with ``timeout=`` runs its branches on spare threads, whose frame kept
    the puller (the fan-out) while it waited for the next job, and after it exited; a fail-fast
    fan-out's frame held the error it raised, and the fan-out: both kept every branch's value in a
    cycle (144 objects per call here)."""
    from stageflow.engine import spare

    monkeypatch.setattr(spare, "IDLE_SECONDS", 0.02)  # (spare threads exit soon after the call)
    program = ForEach(
        stage(_fails_on_pool_threads, writes=["y"]), over="xs", item="x", collect="ys", **options
    )
    raised: list[str] = []

    def call() -> None:
        try:
            kept = program(xs=list(range(16))).item_errors
        except stageflow.StageError as e:  # (fail_fast; the error dropped at the end of this block)
            raised.append(str(e))
            kept = []
        deadline = time.monotonic() + 5
        while spare.spare_thread_count() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)  # (a spare thread counts itself out just before its frame goes)
        if options["on_error"] == "collect":
            assert kept
        del kept

    for _ in range(2):
        call()
    garbage = _own_garbage(call)
    assert not garbage, f"left objects in reference cycles: {dict(garbage.most_common(8))}"
    if options["on_error"] == "fail_fast":
        assert raised
        assert all("item" in message for message in raised)
