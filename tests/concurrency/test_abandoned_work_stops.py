"""Work its caller gave up on stops what it started (``stageflow.engine.stopping``).

A stage's timeout, a fan-out branch's timeout and a ``fail_fast`` fan-out abandon the call they
wait for: a thread cannot be interrupted, but the fan-outs and event-loop calls the abandoned call
started are stopped, so LM requests nobody will read are cancelled instead of answered and billed.
Until session 32 an outer timeout left the inner fan-out's LM calls running to their end.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import dspy
import pytest
from test_sync_fanout_on_loop import Engines

import stageflow
from stageflow import ForEach, SequentialPipeline, Stage, StageflowError, stage
from stageflow.testing import FakeLM, call

LATENCY = 0.4


class Slow(Engines):
    """Engines that answer after ``LATENCY`` seconds, and their LM."""

    def __init__(self) -> None:
        super().__init__(latency=LATENCY)
        self.lm = Engines.lm(self)  # type: ignore[method-assign]

    @property
    def started(self) -> int:
        return self.sync_calls + self.async_calls

    def settled(self) -> tuple[int, int]:
        time.sleep(LATENCY * 2)  # (long past the moment every request would have been answered)
        return self.started, self.answered


def _inner() -> ForEach:
    return ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys")


def test_a_stage_timeout_cancels_the_lm_calls_of_the_fanout_inside(mode: str) -> None:
    slow = Slow()
    program = SequentialPipeline([Stage(_inner(), timeout=0.1, fallback={"ys": ["timed out"]})])
    with dspy.context(lm=slow.lm):
        result = asyncio.run(call(program, mode, xs=["a", "b", "c"]))
        started, answered = slow.settled()
    assert result.ys == ["timed out"]
    assert started == 3  # (they had begun)
    assert answered == 0  # (and none ran on to its answer)
    assert len(slow.lm.history) == 0


def test_a_branch_timeout_cancels_what_that_branch_started_and_no_other() -> None:
    slow = Slow()
    inner = SequentialPipeline([_inner()])

    def work(group: list[str]) -> dict[str, Any]:
        if group == ["quick"]:
            return {"ys": ["done"]}
        return {"ys": inner(xs=group).ys}

    outer = ForEach(
        stage(work, writes=["ys"]),
        over="groups",
        item="group",
        collect={"ys": "results"},
        timeout=0.1,
        on_error="collect",
    )
    with dspy.context(lm=slow.lm):
        result = outer(groups=[["quick"], ["a", "b"]])
        started, answered = slow.settled()
    assert result.results == [["done"], None]  # (the second branch timed out)
    assert started == 2
    assert answered == 0


def test_fail_fast_cancels_the_fanouts_of_the_branches_it_abandons() -> None:
    slow = Slow()

    def work(group: list[str]) -> dict[str, Any]:
        if group == ["boom"]:
            time.sleep(0.05)  # (the other branch's LM calls are out by now)
            raise ValueError("boom")
        return {"ys": _inner()(xs=group).ys}

    outer = ForEach(
        stage(work, writes=["ys"]),
        over="groups",
        item="group",
        collect={"ys": "results"},
        on_error="fail_fast",
    )
    with dspy.context(lm=slow.lm), pytest.raises(Exception, match="boom"):
        outer(groups=[["boom"], ["a", "b"]])
    started, answered = slow.settled()
    assert started == 2
    assert answered == 0


def test_a_timed_out_sync_stage_under_acall_stops_the_fanout_it_started() -> None:
    slow = Slow()
    inner = _inner()

    @stage(writes=["ys"])
    def by_hand(xs: list[str]) -> dict[str, Any]:
        return {"ys": inner(xs=xs).ys}  # (a sync fan-out, from a spare thread)

    program = SequentialPipeline([Stage(by_hand, timeout=0.1, fallback={"ys": ["timed out"]})])
    with dspy.context(lm=slow.lm):
        result = asyncio.run(program.acall(xs=["a", "b"]))
        started, answered = slow.settled()
    assert result.ys == ["timed out"]
    assert started == 2
    assert answered == 0


def test_work_that_finishes_in_time_is_not_stopped(mode: str) -> None:
    slow = Slow()
    program = SequentialPipeline([Stage(_inner(), timeout=LATENCY * 10)])
    with dspy.context(lm=slow.lm):
        result = asyncio.run(call(program, mode, xs=["a", "b"]))
    assert result.ys == ["echo:a", "echo:b"]
    assert slow.answered == 2


# -- LM calls of abandoned work are refused before they are sent (helper 91, c2 / c4) --------------


def test_calls_waiting_on_a_rate_limit_when_the_stage_timed_out_are_never_sent() -> None:
    lm = FakeLM({"answer": "ok"}, model="fake/abandoned-rl")
    each = ForEach(dspy.Predict("question -> answer"), over="questions", collect="answers")
    program = SequentialPipeline([Stage(each, timeout=0.2, fallback={"answers": ["fallback"]})])
    with dspy.context(lm=lm), stageflow.rate_limit(lm.model, rpm=1, window=0.3):
        result = program(questions=list("abcde"))
        assert result.answers == ["fallback"]
        time.sleep(1.8)  # (every call would have had its turn by now: one per 0.3 s)
    assert lm.calls == 1  # (the one that went out before the timeout)


def test_the_stages_after_the_timeout_in_an_abandoned_call_send_nothing(mode: str) -> None:
    lm = FakeLM({"answer": "ok", "summary": "s"}, model="fake/abandoned-seq")

    @stage(writes=["question"])
    def slow(topic: str) -> dict[str, Any]:
        time.sleep(0.3)  # (the timeout passes meanwhile)
        return {"question": topic}

    inner = SequentialPipeline([slow, dspy.Predict("question -> answer"), dspy.Predict("answer -> summary")])
    program = SequentialPipeline(
        [Stage(inner, timeout=0.1, fallback={"question": "", "answer": "", "summary": "fallback"})]
    )
    with dspy.context(lm=lm):
        result = asyncio.run(call(program, mode, topic="t"))
        time.sleep(0.6)
    assert result.summary == "fallback"
    assert lm.calls == 0


# -- awaited calls: a sync stage on a shared-pool thread stops what it started when the awaiting task
# is cancelled (helper 90, 1.1 and 1.2: only the timed path did) ---------------------------------


@pytest.mark.parametrize("how", ["timeout", "fail_fast"])
def test_an_awaited_fanout_whose_branch_runs_a_sync_stage_stops_its_nested_fanout(how: str) -> None:
    slow = Slow()
    inner = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys", max_concurrency=1)

    @stage(writes=["z"])
    def work(x: Any) -> dict[str, Any]:  # (a sync stage: on a thread, its fan-out on the loop)
        if x == "boom":
            time.sleep(0.05)
            raise ValueError("boom")
        return {"z": inner(xs=[f"{x}1", f"{x}2", f"{x}3"]).ys}

    @stage(writes=["w"])
    async def tail(z: list[str]) -> dict[str, Any]:  # (an async stage: the branches are tasks)
        return {"w": z}

    branch = SequentialPipeline([work, tail])
    opts: dict[str, Any] = (
        {"timeout": 0.1, "on_error": "collect"} if how == "timeout" else {"on_error": "fail_fast"}
    )
    outer = ForEach(branch, over="xs", item="x", collect={"w": "ws"}, **opts)
    items = ["a", "b"] if how == "timeout" else ["a", "b", "boom"]
    with dspy.context(lm=slow.lm):
        with pytest.raises(StageflowError, match="timeout" if how == "timeout" else "boom"):
            asyncio.run(outer.acall(xs=items))  # (every branch timed out / the first failure)
        started, answered = slow.settled()
    assert started == 2  # (each branch's first nested call; nothing after)
    assert answered == 0


def test_cancelling_an_awaited_call_stops_the_fanout_its_sync_stage_started() -> None:
    slow = Slow()
    inner = ForEach(dspy.Predict("x -> y"), over="xs", item="x", collect="ys", max_concurrency=1)

    @stage(writes=["ys"])
    def work(xs: list[str]) -> dict[str, Any]:
        return {"ys": inner(xs=xs).ys}

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(SequentialPipeline([work]).acall(xs=["a", "b", "c", "d"]), 0.2)

    with dspy.context(lm=slow.lm):
        asyncio.run(main())
        started, answered = slow.settled()
    assert started == 1
    assert answered == 0


def test_lm_calls_from_dspys_threads_in_an_abandoned_call_are_refused_too() -> None:
    # (helper 92, A1: dspy.Parallel / Module.batch workers copy DSPy's settings, not the context)
    lm = FakeLM({"y": "ok"}, model="fake/abandoned-parallel")
    pred = dspy.Predict("x -> y")
    refused: list[str] = []

    @stage(writes=["y"])
    def slow(x: str) -> dict[str, Any]:
        time.sleep(0.3)  # (the timeout passes meanwhile)
        try:
            dspy.Parallel(num_threads=2, disable_progress_bar=True)(
                [(pred, dspy.Example(x=x).with_inputs("x"))] * 2
            )
        except asyncio.CancelledError:
            refused.append("parallel")
        return {"y": "late"}

    program = SequentialPipeline([Stage(slow, timeout=0.1, fallback={"y": "fallback"})])
    with dspy.context(lm=lm):
        assert program(x="q").y == "fallback"
        time.sleep(0.6)
    assert refused == ["parallel"]
    assert lm.calls == 0


def test_dspys_threads_in_a_call_that_finished_in_time_are_not_refused() -> None:
    lm = FakeLM({"y": "ok"}, model="fake/kept-parallel")
    pred = dspy.Predict("x -> y")

    @stage(writes=["ys"])
    def both(x: str) -> dict[str, Any]:
        out = dspy.Parallel(num_threads=2, disable_progress_bar=True)(
            [(pred, dspy.Example(x=x).with_inputs("x"))] * 2
        )
        return {"ys": [o.y for o in out]}

    program = SequentialPipeline([Stage(both, timeout=5)])
    with dspy.context(lm=lm):
        assert program(x="q").ys == ["ok", "ok"]
    assert lm.calls == 2


def test_a_branch_its_fanout_timed_out_does_not_hold_up_the_interpreters_exit(tmp_path: Any) -> None:
    # (helper 95: the abandoned branch ran on a pool worker, which Python joins at exit: 20 s)
    import subprocess
    import sys

    script = tmp_path / "timed.py"
    script.write_text(
        "import time\n"
        "from stageflow import ForEach, stage\n"
        "@stage(writes=['y'])\n"
        "def slow(x):\n"
        "    time.sleep(30 if x == 'slow' else 0)\n"
        "    return {'y': x}\n"
        "r = ForEach(slow, over='xs', item='x', collect={'y': 'ys'}, timeout=0.3, on_error='collect')"
        "(xs=['a', 'slow'])\n"
        "print(r.ys)\n",
        encoding="utf-8",
    )
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['a', None]"
    assert time.monotonic() - t0 < 15  # (not the 30 s the abandoned branch sleeps)


# -- the branches a sync fan-out leaves running when it ends early (fail_fast, until): the LM calls
# they would still make are refused; the branches that finished keep theirs (session 33) ----------


def _leftover_program(lm_calls_after: float, **opts: Any) -> tuple[ForEach, list[str]]:
    """A ``ForEach`` over ``["boom", "a", ...]`` of a sync stage: ``"boom"`` fails at once; every
    other element calls the LM once at the start and once ``lm_calls_after`` seconds later."""
    pred = dspy.Predict("x -> y")
    seen: list[str] = []

    @stage(writes=["y"])
    def work(x: str) -> dict[str, Any]:
        if x == "boom":
            time.sleep(0.05)  # (the others' first LM calls are out by now)
            raise ValueError("boom")
        first = pred(x=x).y
        time.sleep(lm_calls_after)  # (the fan-out ends meanwhile)
        try:
            second = pred(x=x + "!").y
        except asyncio.CancelledError:
            seen.append("refused")
            raise
        seen.append("sent")
        return {"y": first + second}

    return ForEach(work, over="xs", item="x", collect={"y": "ys"}, **opts), seen


def test_fail_fast_refuses_the_lm_calls_of_the_branches_it_left_running() -> None:
    lm = FakeLM({"y": "ok"}, model="fake/leftover-fail-fast")
    program, seen = _leftover_program(0.3, on_error="fail_fast")
    with dspy.context(lm=lm), pytest.raises(StageflowError, match="boom"):
        program(xs=["boom", "a", "b"])
    time.sleep(0.6)
    assert seen == ["refused", "refused"]
    assert lm.calls == 2  # (the two first calls, sent before the failure)


def test_until_refuses_the_lm_calls_of_the_branches_it_left_running_and_no_other() -> None:
    lm = FakeLM({"y": "ok"}, model="fake/leftover-until")
    pred = dspy.Predict("x -> y")
    refused: list[str] = []

    @stage(writes=["y"])
    def work(x: str) -> dict[str, Any]:
        if x == "quick":
            time.sleep(0.1)  # (the others have started by now)
            return {"y": pred(x=x).y}
        time.sleep(0.3)  # (the fan-out has what it needs by now)
        try:
            return {"y": pred(x=x).y}
        except asyncio.CancelledError:
            refused.append(x)
            raise

    from stageflow.engine.fanout import fan_out

    calls = [lambda x=x: work(x=x) for x in ("quick", "slow1", "slow2")]
    with dspy.context(lm=lm):
        outcomes = fan_out(calls, until=lambda outs: any(o.ok for o in outs))
        time.sleep(0.6)
    assert [o.status for o in outcomes] == ["ok", "cancelled", "cancelled"]
    assert outcomes[0].value == {"y": "ok"}
    assert sorted(refused) == ["slow1", "slow2"]
    assert lm.calls == 1


def test_collect_leaves_every_branch_its_lm_calls() -> None:
    lm = FakeLM({"y": "ok"}, model="fake/leftover-collect")
    program, seen = _leftover_program(0.1, on_error="collect")
    with dspy.context(lm=lm):
        result = program(xs=["boom", "a", "b"])
    assert result.ys == [None, "okok", "okok"]
    assert seen == ["sent", "sent"]
    assert lm.calls == 4


def test_a_finished_branchs_lazy_work_is_not_refused_after_fail_fast() -> None:
    """A branch that finished before the failure keeps its context: LM work it deferred (run after
    the fan-out, in its context) is sent."""
    lm = FakeLM({"y": "ok"}, model="fake/leftover-lazy")
    pred = dspy.Predict("x -> y")
    deferred = _finished_branchs_context(lm)
    with dspy.context(lm=lm):
        assert deferred.run(lambda: pred(x="later").y) == "ok"
    assert lm.calls == 1


def _finished_branchs_context(lm: Any) -> Any:
    """The context of a branch that finished before its ``fail_fast`` fan-out failed."""
    import contextvars

    from stageflow.engine.fanout import fan_out

    deferred: list[contextvars.Context] = []

    def quick() -> str:
        deferred.append(contextvars.copy_context())
        return "quick"

    def boom() -> str:
        time.sleep(0.05)
        raise ValueError("boom")

    with dspy.context(lm=lm), pytest.raises(ValueError, match="boom"):
        fan_out([quick, boom], on_error="fail_fast")
    return deferred[0]


def test_a_lazy_result_a_leftover_branch_made_is_resolved_by_whoever_forces_it_later() -> None:
    """(helper 98, B16) A lazy result kept beyond the branch that made it (a memo shared between
    calls): refused while its abandoned branch forces it, it is not kept as its result; the next
    call that forces it gets the answer."""
    import threading

    from stageflow.policies.lazy import LazyStage

    lm = FakeLM({"answer": "A"}, model="fake/leftover-shared-lazy")
    pred = dspy.Predict("question -> answer")
    lookup = LazyStage(stage(lambda q: {"a": pred(question=q).answer}, writes=["a"]))
    memo: dict[str, Any] = {}
    lock = threading.Lock()

    class Item(dspy.Module):  # type: ignore[misc]
        def forward(self, question: str) -> dspy.Prediction:
            if question == "bad":
                time.sleep(0.05)
                raise ValueError("bad")
            with lock:
                if "topic" not in memo:
                    memo["topic"] = lookup(q="t")  # (made by whichever branch asks first)
                shared = memo["topic"]
            time.sleep(0.3)  # (the fan-out ends meanwhile)
            return dspy.Prediction(answer=question + "/" + shared["a"])

    program = SequentialPipeline([ForEach(Item(), over="qs", item="question", collect={"answer": "answers"})])
    with dspy.context(lm=lm):
        with pytest.raises(StageflowError, match="bad"):
            program(qs=["bad", "x"])
        time.sleep(0.5)
        assert program(qs=["y", "z"]).answers == ["y/A", "z/A"]


def test_a_lazy_result_is_forced_as_work_of_its_forcer_not_of_the_abandoned_branch() -> None:
    from stageflow.engine.stopping import _ENCLOSING, StopSignal
    from stageflow.policies.lazy import LazyStage

    lm = FakeLM({"answer": "A"}, model="fake/lazy-forcer")
    pred = dspy.Predict("question -> answer")
    lookup = LazyStage(stage(lambda q: {"a": pred(question=q).answer}, writes=["a"]))
    branch = StopSignal()
    token = _ENCLOSING.set(branch)
    try:
        with dspy.context(lm=lm):
            deferred = lookup(q="t")  # (made in a branch...)
    finally:
        _ENCLOSING.reset(token)
    branch.abandon("its fan-out ended early")  # (...abandoned before anyone forced it)
    with dspy.context(lm=lm):
        assert deferred["a"] == "A"
    assert lm.calls == 1


@pytest.mark.parametrize(
    ("opts", "reason"),
    [
        ({"on_error": "fail_fast"}, "its fan-out ended early"),
        ({"timeout": 0.1, "on_error": "collect"}, "its timeout passed"),
    ],
)
def test_the_refusal_says_why(opts: dict[str, Any], reason: str) -> None:
    lm = FakeLM({"y": "ok"}, model=f"fake/refusal-reason-{len(reason)}")
    pred = dspy.Predict("x -> y")
    said: list[str] = []

    @stage(writes=["y"])
    def work(x: str) -> dict[str, Any]:
        if x == "bad":
            time.sleep(0.05)
            raise ValueError("bad")
        time.sleep(0.3)
        try:
            return {"y": pred(x=x).y}
        except asyncio.CancelledError as e:
            said.append(str(e))
            raise

    program = ForEach(work, over="xs", item="x", collect={"y": "ys"}, **opts)
    # ("a" times out, so every element failed; or "bad" fails and ends the fan-out while "a" runs)
    items, error = (["a"], "timeout") if "timeout" in opts else (["bad", "a"], "bad")
    with dspy.context(lm=lm), pytest.raises(StageflowError, match=error):
        program(xs=items)
    time.sleep(0.5)
    assert len(said) == 1
    assert f"({reason})" in said[0]


def test_a_lazy_result_whose_stage_raises_cancelled_error_runs_once() -> None:
    """(helper 99, R4) Only a refusal of an abandoned forcer is not kept: a CancelledError the stage
    raises itself is its result, and forcing it again does not run the stage again."""
    import concurrent.futures as cf
    import threading

    from stageflow.policies.lazy import LazyStage

    runs: list[int] = stageflow.untracked([])

    @stage(writes=["y"])
    def cancels(x: int) -> dict[str, Any]:
        runs.append(x)
        raise asyncio.CancelledError("inner task cancelled")

    result = LazyStage(cancels)(x=1)
    barrier = threading.Barrier(8)

    def force() -> str:
        barrier.wait()
        try:
            result["y"]
        except BaseException as e:
            return type(e).__name__
        return "no error"

    with cf.ThreadPoolExecutor(8) as pool:
        seen = set(pool.map(lambda _: force(), range(8)))
    assert seen == {"CancelledError"}
    assert runs == [1]
    assert result.done


@pytest.mark.parametrize(
    ("opts", "reason"),
    [
        ({"on_error": "fail_fast"}, "its fan-out ended early"),
        ({"timeout": 0.15, "on_error": "collect"}, "its timeout passed"),  # (both time out)
    ],
)
def test_dspys_threads_in_a_branch_its_fan_out_left_are_refused_too(
    opts: dict[str, Any], reason: str
) -> None:
    """(session 33's left-out item) A branch left running — after ``fail_fast``, or timed out — whose
    stage starts ``dspy.Parallel`` afterwards: its workers copy DSPy's settings, not the context, so
    they saw no stop signal and sent their LM calls, billed for nobody."""
    lm = FakeLM({"y": "ok"}, model=f"fake/leftover-parallel-{len(reason)}")
    pred = dspy.Predict("x -> y")
    refused: list[str] = []

    @stage(writes=["y"])
    def work(x: str) -> dict[str, Any]:
        if x == "boom":
            time.sleep(0.05)
            raise ValueError("boom")
        if x == "quick":
            return {"y": "q"}
        time.sleep(0.3)  # (the fan-out ends, or the branch times out, meanwhile)
        try:
            dspy.Parallel(num_threads=2, disable_progress_bar=True)(
                [(pred, dspy.Example(x=x).with_inputs("x"))] * 2
            )
        except asyncio.CancelledError as e:
            refused.append(str(e))
            raise
        return {"y": "late"}

    program = ForEach(work, over="xs", item="x", collect={"y": "ys"}, **opts)
    with dspy.context(lm=lm):
        if opts["on_error"] == "fail_fast":
            with pytest.raises(StageflowError, match="boom"):
                program(xs=["boom", "a", "b"])
        else:
            assert program(xs=["quick", "a", "b"]).ys == ["q", None, None]
    time.sleep(0.6)
    assert len(refused) == 2
    assert all(reason in r for r in refused)
    assert lm.calls == 0


def test_dspys_threads_in_branches_that_finish_are_not_refused() -> None:
    lm = FakeLM({"y": "ok"}, model="fake/finished-parallel")
    pred = dspy.Predict("x -> y")

    @stage(writes=["y"])
    def work(x: str) -> dict[str, Any]:
        out = dspy.Parallel(num_threads=2, disable_progress_bar=True)(
            [(pred, dspy.Example(x=x).with_inputs("x"))] * 2
        )
        return {"y": "".join(o.y for o in out)}

    program = ForEach(work, over="xs", item="x", collect={"y": "ys"}, timeout=5)
    with dspy.context(lm=lm):
        assert program(xs=["a", "b"]).ys == ["okok", "okok"]
    assert lm.calls == 4


def test_a_finished_branchs_deferred_dspy_threads_are_not_refused_after_fail_fast() -> None:
    """The signal a branch publishes for DSPy's threads is its own: a branch that finished before
    the failure is not refused in the threads its deferred work starts."""
    lm = FakeLM({"y": "ok"}, model="fake/finished-deferred-parallel")
    pred = dspy.Predict("x -> y")

    def parallel() -> list[str]:
        out = dspy.Parallel(num_threads=2, disable_progress_bar=True)(
            [(pred, dspy.Example(x="l").with_inputs("x"))] * 2
        )
        return [o.y for o in out]

    deferred = _finished_branchs_context(lm)
    with dspy.context(lm=lm):
        assert deferred.run(parallel) == ["ok", "ok"]
    assert lm.calls == 2


def test_a_lazy_result_a_leftover_branch_made_starts_dspy_threads_for_its_forcer() -> None:
    """A lazy result made in a branch left running, forced later by another call: the threads its
    stage starts (``dspy.Parallel``) work for that call, not for the abandoned branch."""
    import threading

    from stageflow.policies.lazy import LazyStage

    lm = FakeLM({"y": "ok"}, model="fake/lazy-forcer-parallel")
    pred = dspy.Predict("x -> y")

    def both(x: str) -> dict[str, str]:
        examples = [(pred, dspy.Example(x=x).with_inputs("x"))] * 2
        out = dspy.Parallel(num_threads=2, disable_progress_bar=True)(examples)
        return {"ys": "".join(o.y for o in out)}

    lookup = LazyStage(stage(both, writes=["ys"]))
    memo: dict[str, Any] = {}
    lock = threading.Lock()
    made = threading.Event()

    class Item(dspy.Module):  # type: ignore[misc]
        def forward(self, question: str) -> dspy.Prediction:
            if question == "bad":
                made.wait(5)
                raise ValueError("bad")
            with lock:
                if "topic" not in memo:
                    memo["topic"] = lookup(x="t")  # (made by the branch left running)
                    made.set()
            time.sleep(0.3 if question == "slow" else 0)  # (the fan-out ends meanwhile)
            return dspy.Prediction(answer=memo["topic"]["ys"] if question != "slow" else "-")

    program = SequentialPipeline([ForEach(Item(), over="qs", item="question", collect={"answer": "answers"})])
    with dspy.context(lm=lm):
        with pytest.raises(StageflowError, match="bad"):
            program(qs=["bad", "slow"])
        time.sleep(0.5)
        assert program(qs=["y"]).answers == ["okok"]
    assert lm.calls == 2


@pytest.mark.parametrize("policy", ["collect", "skip"])
def test_dspys_threads_of_a_collect_fan_out_interrupted_are_refused(policy: str) -> None:
    """(helper 102, F1) A ``collect`` / ``skip`` fan-out's branches share its signal; it was not in
    DSPy's settings, so the ``dspy.Parallel`` workers of branches still running when an element
    raised ``KeyboardInterrupt`` sent their calls (12 per run)."""
    lm = FakeLM({"y": "ok"}, model=f"fake/interrupted-{policy}")
    pred = dspy.Predict("x -> y")
    refused: list[str] = []

    @stage(writes=["y"])
    def item(x: int) -> dict[str, Any]:
        if x == 0:
            time.sleep(0.05)
            raise KeyboardInterrupt
        time.sleep(0.2)  # (the interrupt has reached the caller by now)
        try:
            dspy.Parallel(num_threads=2, disable_progress_bar=True)(
                [(pred, dspy.Example(x=str(x)).with_inputs("x"))] * 2
            )
        except asyncio.CancelledError as e:
            refused.append(str(e))
            raise
        return {"y": "late"}

    program = ForEach(item, over="xs", item="x", collect="ys", on_error=policy)
    with dspy.context(lm=lm):
        ForEach(stage(lambda x: {"y": pred(x=x).y}, writes=["y"]), over="xs", item="x", collect="ys")(
            xs=["w"]
        )
        warm = lm.calls
        with pytest.raises(KeyboardInterrupt):
            program(xs=[0, 1, 2])
        time.sleep(0.5)
    assert len(refused) == 2  # (a branch the caller runs itself too: the interrupt stops it at once)
    assert lm.calls == warm
