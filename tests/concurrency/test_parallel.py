"""ParallelPipeline: groups in order, stages of a group concurrently, merging, failures, timeouts."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ContractError, ParallelPipeline, PipelineError, ResultMerger, StageError
from stageflow.testing import Counter, FakeLM, call


def writer(
    field: str, value: Any, delay: float = 0.0, log: list[str] | None = None, mode: str = "sync"
) -> stageflow.FunctionStage:
    """A stage writing ``field``; in async mode an ``async def`` (a sync body would block the loop)."""

    def work(question: str) -> dict[str, Any]:
        if log is not None:
            log.append(f"start:{field}:{value}")
        time.sleep(delay)
        if log is not None:
            log.append(f"end:{field}:{value}")
        return {field: value}

    async def awork(question: str) -> dict[str, Any]:
        if log is not None:
            log.append(f"start:{field}:{value}")
        await asyncio.sleep(delay)
        if log is not None:
            log.append(f"end:{field}:{value}")
        return {field: value}

    return stageflow.stage(awork if mode == "async" else work, writes=[field], name=f"write_{field}")


def failing(field: str) -> stageflow.FunctionStage:
    def work(question: str) -> dict[str, Any]:
        raise ValueError(f"no {field}")

    return stageflow.stage(work, writes=[field], name=f"fail_{field}")


# -- order and overlap -------------------------------------------------------------------------------


async def test_groups_run_in_order(mode: str) -> None:
    log: list[str] = []

    def combine(a: str, b: str) -> dict[str, str]:
        log.append("start:c")
        return {"c": a + b}

    p = ParallelPipeline(
        [
            [writer("a", "A", 0.05, log, mode), writer("b", "B", 0.01, log, mode)],
            stageflow.stage(combine, writes=["c"]),
        ]
    )
    result = await call(p, mode, question="q")
    assert result.c == "AB"
    assert log.index("start:c") > log.index("end:a:A")
    assert log.index("start:c") > log.index("end:b:B")
    # a and b overlapped: both started before either ended
    assert max(log.index("start:a:A"), log.index("start:b:B")) < min(
        log.index("end:a:A"), log.index("end:b:B")
    )


async def test_stages_within_a_group_overlap_and_groups_do_not(mode: str) -> None:
    # each call waits (briefly) for 3 to overlap: the first group reaches 3, the second group cannot
    lm = FakeLM({"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}, rendezvous=3, rendezvous_timeout=0.3)
    p = ParallelPipeline(
        [
            [dspy.Predict("question -> a"), dspy.Predict("question -> b"), dspy.Predict("question -> c")],
            [dspy.Predict("a, b -> d"), dspy.Predict("c -> e")],
        ]
    )
    with dspy.context(lm=lm):
        result = await call(p, mode, question="q")
    assert (result.a, result.b, result.c, result.d, result.e) == ("1", "2", "3", "4", "5")
    assert lm.calls == 5
    assert lm.peak_active == 3  # the group of 3 overlapped; the next group did not join it


async def test_max_concurrency_caps_a_group(mode: str) -> None:
    lm = FakeLM({}, rendezvous=2)
    p = ParallelPipeline([[dspy.Predict(f"question -> out{i}") for i in range(6)]], max_concurrency=2)
    with dspy.context(lm=lm):
        result = await call(p, mode, question="q")
    assert [result[f"out{i}"] for i in range(6)] == ["ok"] * 6
    assert lm.peak_active == 2


# -- merging ---------------------------------------------------------------------------------------------


async def test_distinct_fields_merge(mode: str) -> None:
    p = ParallelPipeline([[writer("summary", "S"), writer("keywords", ["k1", "k2"]), writer("topic", "T")]])
    result = await call(p, mode, question="q")
    assert result.summary == "S"
    assert result.keywords == ["k1", "k2"]
    assert result.topic == "T"
    assert result.question == "q"


def test_clash_with_error_strategy_is_rejected_at_construction() -> None:
    with pytest.raises(ContractError) as ei:
        ParallelPipeline(
            [[dspy.Predict("question -> answer"), dspy.Predict("question -> answer")]],
            ResultMerger(on_clash="error"),
        )
    assert ei.value.code == "output_clash"
    assert ei.value.field == "answer"
    assert ei.value.stage_path == "stages[1]"


def test_same_field_in_different_groups_is_not_a_clash() -> None:
    lm = FakeLM({"answer": "a"})
    p = ParallelPipeline([dspy.Predict("question -> answer"), dspy.Predict("question -> answer")])
    with dspy.context(lm=lm):
        assert p(question="q").answer == "a"
    assert lm.calls == 2


def test_default_merger_treats_a_clash_as_an_error() -> None:
    with pytest.raises(ContractError) as ei:
        ParallelPipeline([[writer("note", "a"), writer("note", "b")]])
    assert ei.value.code == "output_clash"


async def test_clash_as_list_keeps_stage_order_not_finish_order(mode: str) -> None:
    log: list[str] = []
    p = ParallelPipeline(
        [[writer("note", "first", 0.2, log, mode), writer("note", "second", 0.01, log, mode)]],
        ResultMerger(on_clash="list"),
    )
    result = await call(p, mode, question="q")
    assert log.index("end:note:second") < log.index("end:note:first")  # finished in reverse
    assert result.note == ["first", "second"]


async def test_clash_concatenate_joins_strings_and_lists(mode: str) -> None:
    p = ParallelPipeline(
        [[writer("note", "x"), writer("note", "y"), writer("tags", ["a"]), writer("tags", ["b", "c"])]],
        ResultMerger(on_clash="concatenate", separator=" | "),
    )
    result = await call(p, mode, question="q")
    assert result.note == "x | y"
    assert result.tags == ["a", "b", "c"]


def test_unknown_clash_strategy_is_a_configuration_error() -> None:
    with pytest.raises(stageflow.ConfigurationError) as ei:
        ResultMerger(on_clash="last")  # type: ignore[arg-type]
    assert ei.value.code == "bad_option"


# -- failures and timeouts ---------------------------------------------------------------------------


async def test_a_failing_branch_is_recorded_and_the_others_kept(mode: str) -> None:
    p = ParallelPipeline([[writer("summary", "S"), failing("keywords"), writer("topic", "T")]])
    result = await call(p, mode, question="q")
    assert result.summary == "S"
    assert result.topic == "T"
    assert "keywords" not in result
    [group] = result.group_results
    assert set(group) == {"stages[0]", "stages[1]", "stages[2]"}
    assert group["stages[0]"]["status"] == "ok"
    assert group["stages[2]"]["status"] == "ok"
    assert group["stages[1]"]["status"] == "error"
    err = group["stages[1]"]["error"]
    assert isinstance(err, StageError)
    assert err.stage_path == "stages[1]"
    assert isinstance(err.__cause__, ValueError)


async def test_group_results_has_one_report_per_group(mode: str) -> None:
    p = ParallelPipeline([[writer("a", 1), writer("b", 2)], [writer("c", 3)]])
    result = await call(p, mode, question="q")
    assert [sorted(g) for g in result.group_results] == [["stages[0]", "stages[1]"], ["stages[2]"]]
    assert all(r["status"] == "ok" for g in result.group_results for r in g.values())


async def test_all_branches_failing_is_a_pipeline_error_keyed_by_path(mode: str) -> None:
    after = Counter("after")
    p = ParallelPipeline([[failing("a"), failing("b")], after.as_stage()])
    with pytest.raises(PipelineError) as ei:
        await call(p, mode, question="q")
    assert ei.value.code == "all_failed"
    assert set(ei.value.errors) == {"stages[0]", "stages[1]"}
    assert all(isinstance(e, StageError) for e in ei.value.errors.values())
    assert ei.value.errors["stages[1]"].stage_path == "stages[1]"
    assert after.n == 0  # the next group never ran


async def test_fail_fast_raises_the_branch_error(mode: str) -> None:
    after = Counter("after")
    p = ParallelPipeline([[writer("a", 1), failing("b")], after.as_stage()], on_error="fail_fast")
    with pytest.raises(StageError) as ei:
        await call(p, mode, question="q")
    assert ei.value.stage_path == "stages[1]"
    assert isinstance(ei.value.__cause__, ValueError)
    assert after.n == 0


def test_sync_branch_timeout_keeps_the_other_branches() -> None:
    release = threading.Event()

    def slow(question: str) -> dict[str, str]:
        release.wait(2.0)
        return {"slow": "late"}

    p = ParallelPipeline([[writer("fast", "F"), stageflow.stage(slow, writes=["slow"])]], timeout=0.1)
    try:
        result = p(question="q")
    finally:
        release.set()
    assert result.fast == "F"
    assert "slow" not in result
    group = result.group_results[0]
    assert group["stages[0]"]["status"] == "ok"
    assert group["stages[1]"]["status"] == "timeout"
    assert isinstance(group["stages[1]"]["error"], TimeoutError)


async def test_async_branch_timeout_cancels_the_branch() -> None:
    cancelled: list[str] = []

    async def slow(question: str) -> dict[str, str]:
        try:
            await asyncio.sleep(2.0)
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise
        return {"slow": "late"}

    lm = FakeLM({"fast": "F"})
    p = ParallelPipeline(
        [[dspy.Predict("question -> fast"), stageflow.stage(slow, writes=["slow"])]], timeout=0.2
    )
    with dspy.context(lm=lm):
        result = await p.acall(question="q")
    assert result.fast == "F"
    assert "slow" not in result
    assert result.group_results[0]["stages[1]"]["status"] == "timeout"
    assert result.group_results[0]["stages[0]"]["status"] == "ok"
    assert cancelled == ["slow"]
