"""What crosses into fan-out branches: dspy.context, usage tracking, observer hooks; no thread leak."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import dspy

import stageflow
from stageflow import EnsemblePipeline, ForEach, ParallelPipeline, SequentialPipeline
from stageflow.testing import FakeLM, call


def facts_then_answer() -> SequentialPipeline:
    return SequentialPipeline(
        [
            ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts"),
            dspy.Predict("facts -> answer"),
        ]
    )


def script() -> dict[str, Any]:
    return {"fact": lambda i: "fact about " + i["sub_question"], "answer": "done", "a": "1", "b": "2"}


SUBS = ["alpha", "beta", "gamma", "delta"]


# -- dspy.context ----------------------------------------------------------------------------------


async def test_context_lm_reaches_every_branch(mode: str) -> None:
    lm = FakeLM(script())
    p = SequentialPipeline(
        [
            ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts"),
            ParallelPipeline([[dspy.Predict("facts -> a"), dspy.Predict("facts -> b")]]),
            EnsemblePipeline([dspy.Predict("a, b -> answer") for _ in range(3)]),
        ]
    )
    # No LM is configured globally (conftest isolation): a branch without the context would fail.
    assert dspy.settings.lm is None
    with dspy.context(lm=lm):
        result = await call(p, mode, sub_questions=[f"q{i}" for i in range(8)])
    assert result.answer == "done"
    assert result.facts == [f"fact about q{i}" for i in range(8)]
    assert lm.calls == 8 + 2 + 3


def test_context_reaches_async_stages_run_from_a_sync_call() -> None:
    lm = FakeLM(script())
    predict = dspy.Predict("sub_question -> fact")

    async def fact(sub_question: str) -> dict[str, str]:
        return {"fact": (await predict.acall(sub_question=sub_question)).fact}

    p = ForEach(stageflow.stage(fact, writes=["fact"]), over="sub_questions", collect="facts")
    with dspy.context(lm=lm):
        result = p(sub_questions=["a", "b", "c"])  # the branches run on stageflow's event loop
    assert result.facts == ["fact about a", "fact about b", "fact about c"]
    assert result.item_errors == []
    assert lm.calls == 3


def test_concurrent_callers_keep_their_own_context_on_the_shared_pool() -> None:
    lms = {name: FakeLM({"fact": lambda i, n=name: n}, latency=0.01) for name in ("red", "blue", "green")}
    p = ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts")
    results: dict[str, list[str]] = {}
    barrier = threading.Barrier(len(lms))

    def run(name: str) -> None:
        with dspy.context(lm=lms[name]):
            barrier.wait()
            results[name] = p(sub_questions=[f"q{i}" for i in range(12)]).facts

    threads = [threading.Thread(target=run, args=(n,)) for n in lms]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert {n: set(r) for n, r in results.items()} == {n: {n} for n in lms}
    assert all(lm.calls == 12 for lm in lms.values())


async def test_concurrent_tasks_keep_their_own_context() -> None:
    lms = {name: FakeLM({"fact": lambda i, n=name: n}, latency=0.01) for name in ("red", "blue")}
    p = ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts")

    async def run(name: str) -> list[str]:
        with dspy.context(lm=lms[name]):
            return (await p.acall(sub_questions=[f"q{i}" for i in range(12)])).facts  # type: ignore[no-any-return]

    red, blue = await asyncio.gather(run("red"), run("blue"))
    assert set(red) == {"red"}
    assert set(blue) == {"blue"}
    assert lms["red"].calls == lms["blue"].calls == 12


# -- usage tracking ---------------------------------------------------------------------------------------


def sequential_reference_tokens() -> dict[str, Any]:
    """The same five calls made one after another, outside any fan-out."""
    lm = FakeLM(script())
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        facts = [dspy.Predict("sub_question -> fact")(sub_question=q).fact for q in SUBS]
        dspy.Predict("facts -> answer")(facts=facts)
    assert lm.calls == 5
    return tracker.get_total_tokens()[lm.model]  # type: ignore[no-any-return]


async def test_track_usage_context_counts_tokens_of_every_branch(mode: str) -> None:
    expected = sequential_reference_tokens()
    lm = FakeLM(script())
    with dspy.context(lm=lm, track_usage=True):
        result = await call(facts_then_answer(), mode, sub_questions=SUBS)
    assert lm.calls == 5
    usage = result.get_lm_usage()[lm.model]
    assert usage["prompt_tokens"] == expected["prompt_tokens"]
    assert usage["completion_tokens"] == expected["completion_tokens"]
    assert usage["total_tokens"] == expected["total_tokens"]


async def test_track_usage_manager_counts_tokens_of_every_branch(mode: str) -> None:
    expected = sequential_reference_tokens()
    lm = FakeLM(script())
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        await call(facts_then_answer(), mode, sub_questions=SUBS)
    total = tracker.get_total_tokens()[lm.model]
    assert total["total_tokens"] == expected["total_tokens"]
    assert total["prompt_tokens"] == expected["prompt_tokens"]
    # One fan-out call alone would be about a fifth of it: the branches were not lost.
    single = FakeLM(script())
    with dspy.context(lm=single), dspy.track_usage() as one:
        dspy.Predict("sub_question -> fact")(sub_question="alpha")
    assert total["total_tokens"] > 4 * one.get_total_tokens()[single.model]["total_tokens"]


async def test_usage_from_nested_fan_outs_is_kept(mode: str) -> None:
    lm = FakeLM(script())
    ens = EnsemblePipeline([facts_then_answer() for _ in range(3)])
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        await call(ens, mode, sub_questions=SUBS)
    assert lm.calls == 15
    assert (
        tracker.get_total_tokens()[lm.model]["total_tokens"]
        == 3 * sequential_reference_tokens()["total_tokens"]
    )


# -- hooks across threads -----------------------------------------------------------------------------------


async def test_profile_counts_every_branch_execution(mode: str) -> None:
    lm = FakeLM(script())
    p = ParallelPipeline(
        [
            [
                ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts"),
                dspy.Predict("question -> a"),
            ]
        ]
    )
    with dspy.context(lm=lm), stageflow.profile() as prof:
        await call(p, mode, question="q", sub_questions=["x", "y", "z"])
        await call(p, mode, question="q", sub_questions=["x", "y"])
    summary = prof.get_performance_summary()
    counts = {path: s["num_executions"] for path, s in summary.items()}
    assert counts == {
        "stages[0]": 2,
        "stages[0].stage[0]": 2,
        "stages[0].stage[1]": 2,
        "stages[0].stage[2]": 1,
        "stages[1]": 2,
    }
    assert all(s["errors"] == 0 for s in summary.values())
    assert prof.runs == 2


async def test_profile_counts_failed_branches_as_errors(mode: str) -> None:
    def work(x: str) -> dict[str, str]:
        if x == "bad":
            raise ValueError("bad")
        return {"y": x}

    p = ForEach(stageflow.stage(work, writes=["y"]), over="xs", item="x", on_error="collect")
    with stageflow.profile() as prof:
        await call(p, mode, xs=["a", "bad", "c"])
    summary = prof.get_performance_summary()
    assert {path: s["errors"] for path, s in summary.items()} == {"stage[0]": 0, "stage[1]": 1, "stage[2]": 0}


async def test_trace_records_start_and_end_of_each_item(mode: str) -> None:
    lm = FakeLM(script(), latency=0.02)
    p = SequentialPipeline(
        [
            stageflow.stage(
                lambda question: {"sub_questions": ["a", "b", "c", "d"]}, writes=["sub_questions"]
            ),
            ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts"),
        ]
    )
    with dspy.context(lm=lm), stageflow.trace() as tracer:
        await call(p, mode, question="q")
    events = [(e["event"], e["stage"]) for e in tracer.events]
    item_paths = [f"stages[1].stage[{i}]" for i in range(4)]
    for path in item_paths:
        assert events.count(("stage_start", path)) == 1
        assert events.count(("stage_end", path)) == 1
        assert events.index(("stage_start", path)) < events.index(("stage_end", path))
        assert events.index(("stage_start", "stages[1]")) < events.index(("stage_start", path))
        assert events.index(("stage_end", path)) < events.index(("stage_end", "stages[1]"))
    starts = [events.index(("stage_start", p)) for p in item_paths]
    ends = [events.index(("stage_end", p)) for p in item_paths]
    assert max(starts) < min(ends)  # all four were running at once
    ends_by_path = {e["stage"]: e for e in tracer.events if e["event"] == "stage_end"}
    assert [ends_by_path[p]["outputs"]["fact"] for p in item_paths] == [f"fact about {x}" for x in "abcd"]
    if mode == "sync":
        assert len({e["thread"] for e in tracer.events if e["stage"] in item_paths}) > 1


# -- threads -----------------------------------------------------------------------------------------------


def test_repeated_fan_outs_reuse_the_pool() -> None:
    lm = FakeLM({"fact": "f"}, rendezvous=16)
    p = ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts")
    items = [f"q{i}" for i in range(16)]
    with dspy.context(lm=lm):
        p(sub_questions=items)  # warm the pool
        initial = threading.active_count()
        for _ in range(20):
            assert p(sub_questions=items).facts == ["f"] * 16
    assert lm.calls == 21 * 16
    assert threading.active_count() <= initial + 16 + 2
    assert lm.peak_active == 16


def stageflow_threads() -> set[int]:
    return {t.ident for t in threading.enumerate() if t.name.startswith("stageflow") and t.ident is not None}


async def test_repeated_async_fan_outs_use_no_stageflow_threads() -> None:
    lm = FakeLM({"fact": "f"}, latency=0.005)
    p = ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts")
    with dspy.context(lm=lm):
        await p.acall(sub_questions=["warm", "up"])  # DSPy itself uses the loop's default executor
        lm.rendezvous = 16  # from here on, every call waits for all 16 items to overlap
        initial, ours = threading.active_count(), stageflow_threads()
        for _ in range(20):
            await p.acall(sub_questions=[f"q{i}" for i in range(16)])
    assert lm.calls == 2 + 320
    assert lm.peak_active == 16
    assert stageflow_threads() <= ours  # branches are tasks, not pool threads
    assert threading.active_count() <= initial + 32  # at most the default executor's own bound
