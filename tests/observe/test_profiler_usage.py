"""The profiler: per-stage usage, the table, to_dict, critical path and perfect-parallel time."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import dspy
import pytest
from usage_kit import WIDTH, CostlyLM, fan_out_lm, fan_out_program, quiet_legacy_lm

import stageflow
from stageflow.observe.profile_table import group_key, split_path
from stageflow.observe.schedule import SpanNode, critical_path, ideal_time
from stageflow.testing import call


async def test_summary_carries_each_stages_usage(mode: str) -> None:
    lm = fan_out_lm()
    with dspy.context(lm=lm), stageflow.profile() as prof:
        result = await call(fan_out_program(), mode, question="q")
    summary = prof.get_performance_summary()
    usage = result.run.usage
    assert list(summary)[:2] == ["stages[0]", "stages[1]"]  # the order the stages started
    for path in ("stages[0]", "stages[1].stage[5]", "stages[2].processors[1]"):
        assert summary[path]["lm_calls"] == 1
        assert summary[path]["input_tokens"] == usage[path].input_tokens
        assert summary[path]["output_tokens"] == usage[path].output_tokens
    assert summary["stages[1]"]["lm_calls"] == WIDTH  # a pipeline stage: its items included
    assert summary["stages[3]"]["lm_calls"] == 0
    totals = prof.totals()
    assert totals["runs"] == 1
    assert totals["lm_calls"] == lm.calls
    assert totals["input_tokens"] == usage.total.input_tokens
    assert prof.last_run is not None
    assert prof.last_run.usage == usage.total
    assert prof.last_run.stage_calls == 4 + WIDTH + 3
    json.dumps(prof.to_dict())  # JSON-ready


def test_table_rows_totals_and_critical_path() -> None:
    lm = fan_out_lm()
    program = fan_out_program()
    with dspy.context(lm=lm), stageflow.profile() as prof:
        program(question="q")
        program(question="q")
    text = prof.table()
    lines = text.splitlines()
    header = lines[0].split()
    assert header[:4] == ["stage", "calls", "total", "s"]
    for column in ("LM", "tokens", "cost", "cache", "retries", "repairs", "errors"):
        assert column in header
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip() and line[0] != " "}
    items = next(line.split() for line in lines if "stages[1].stage[*]" in line)
    assert items[1] == str(2 * WIDTH)  # calls, both runs, every item
    assert items[4] == str(2 * WIDTH)  # LM calls
    assert rows["stages[0]"][1] == "2"
    total = next(line for line in lines if line.startswith("all runs (2)"))
    assert total.split()[6] == str(2 * (1 + WIDTH + 3))  # LM calls over both runs
    assert any(line.startswith("critical path: stages[0] (") for line in lines)
    assert "perfect parallel schedule" in text
    ungrouped = prof.table(group_items=False)
    assert "stages[1].stage[31]" in ungrouped
    assert "stage[*]" not in ungrouped


async def test_cost_column(mode: str) -> None:
    lm = CostlyLM(price=0.125)
    program = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    with quiet_legacy_lm(), dspy.context(lm=lm), stageflow.profile() as prof:
        await call(program, mode, question="q")
        await call(program, mode, question="q")
    assert prof.get_performance_summary()["stages[0]"]["cost"] == pytest.approx(0.25)
    row = next(line for line in prof.table().splitlines() if line.startswith("stages[0]"))
    assert "0.2500" in row.split()
    assert prof.to_dict()["totals"]["cost"] == pytest.approx(0.25)


def _sleeper(name: str, seconds: float) -> stageflow.FunctionStage:
    def nap(**kwargs: Any) -> dict[str, Any]:
        time.sleep(seconds)
        return {name: seconds}

    return stageflow.stage(nap, reads=[], writes=[name], name=name)


def _item_stage() -> stageflow.FunctionStage:
    async def nap(item: float) -> dict[str, Any]:
        await asyncio.sleep(item)
        return {"slept": item}

    return stageflow.stage(nap, writes=["slept"], name="nap")


async def test_critical_path_goes_through_the_slowest_item(mode: str) -> None:
    program = stageflow.SequentialPipeline(
        [
            _sleeper("first", 0.02),
            stageflow.ForEach(_item_stage(), over="naps", item="item", collect="slept"),
            _sleeper("last", 0.005),
        ]
    )
    with stageflow.profile() as prof:
        await call(program, mode, naps=[0.01, 0.15, 0.01, 0.01])
    run = prof.last_run
    assert run is not None
    assert [s.path for s in run.critical_path] == ["stages[0]", "stages[1].stage[1]", "stages[2]"]
    assert run.ideal_time <= run.critical_time <= run.wall
    # Perfect parallelism: the items overlap, so only the slowest counts.
    slowest = prof.get_performance_summary()["stages[1].stage[1]"]["total_time"]
    first = prof.get_performance_summary()["stages[0]"]["total_time"]
    last = prof.get_performance_summary()["stages[2]"]["total_time"]
    assert run.ideal_time == pytest.approx(first + slowest + last)


async def test_items_run_one_at_a_time_are_taken_as_a_sequence(mode: str) -> None:
    program = stageflow.SequentialPipeline(
        [stageflow.ForEach(_item_stage(), over="naps", item="item", collect="slept", max_concurrency=1)]
    )
    with stageflow.profile() as prof:
        await call(program, mode, naps=[0.005, 0.005, 0.005])
    run = prof.last_run
    assert run is not None
    assert [s.path for s in run.critical_path] == [f"stages[0].stage[{i}]" for i in range(3)]
    items = [prof.get_performance_summary()[f"stages[0].stage[{i}]"]["total_time"] for i in range(3)]
    assert run.ideal_time == pytest.approx(sum(items))


def test_a_failed_run_is_profiled_too() -> None:
    def boom(x: int) -> dict[str, Any]:
        raise ValueError("no")

    program = stageflow.SequentialPipeline([_sleeper("ok", 0.0), stageflow.stage(boom, writes=["y"])])
    with stageflow.profile() as prof, pytest.raises(stageflow.StageError):
        program(x=1)
    run = prof.last_run
    assert run is not None
    assert run.error is not None
    assert run.error.startswith("StageError")
    assert [s.path for s in run.critical_path] == ["stages[0]", "stages[1]"]
    assert prof.get_performance_summary()["stages[1]"]["errors"] == 1
    assert "the run failed: StageError" in prof.table()


def test_profiling_pipeline_keeps_usage_per_call() -> None:
    lm = fan_out_lm()
    program = stageflow.ProfilingPipeline(
        [dspy.Predict("question -> answer"), dspy.Predict("answer -> shout")]
    )
    with dspy.context(lm=lm):
        result = program(question="q")
        program(question="q")
    assert result.run.usage["stages[0]"].lm_calls == 1
    assert len(result.profile_data["stage_0"]) == 1  # the tutorial's raw record of this call
    assert program.profiler.get_performance_summary()["stages[1]"]["lm_calls"] == 2
    assert program.profiler.runs == 2
    assert len(program.profiler.run_profiles) == 2


def test_schedule_on_a_hand_made_tree() -> None:
    loop = SpanNode(
        "loop",
        1.0,
        7.0,
        [SpanNode("loop.step", 1.0, 3.0), SpanNode("loop.step", 3.0, 5.0), SpanNode("loop.step", 5.0, 7.0)],
    )
    fan = SpanNode("fan", 7.0, 12.0, [SpanNode("fan.a", 7.0, 9.0), SpanNode("fan.b", 7.5, 11.5)])
    run = SpanNode("", 0.0, 12.5, [SpanNode("start", 0.0, 1.0), loop, fan])
    assert [s.path for s in critical_path(run)] == ["start", "loop.step", "loop.step", "loop.step", "fan.b"]
    assert [s.start for s in critical_path(run)] == [0.0, 1.0, 3.0, 5.0, 7.5]
    assert ideal_time(run) == pytest.approx(1.0 + 6.0 + 4.0)
    assert critical_path(SpanNode("", 0.0, 1.0)) == []
    assert ideal_time(SpanNode("", 0.0, 1.0)) == 0.0  # no stage ran: all of it went to the pipeline


def test_path_helpers() -> None:
    assert split_path("") == [""]
    assert split_path("branches['x.y'].stages[0]") == ["branches['x.y']", "stages[0]"]
    assert group_key("stages[2].stage[10]") == "stages[2].stage[*]"
    assert group_key("stages[2].stages[10]") == "stages[2].stages[10]"


async def test_cancelled_items_are_counted_but_the_failure_is_the_critical_path() -> None:
    async def item(x: int) -> dict[str, Any]:
        if x == 0:
            await asyncio.sleep(0.01)
            raise ValueError("boom")
        await asyncio.sleep(5)
        return {"y": x}

    program = stageflow.SequentialPipeline(
        [stageflow.ForEach(stageflow.stage(item, writes=["y"]), over="xs", item="x", collect="y")]
    )
    with stageflow.profile() as prof, pytest.raises(stageflow.StageError):
        # The failing element starts last: the cancelled ones started before it and ran until the
        # failure stopped them, after it ended. The failure decided when the fan-out ended, so it
        # is the critical path; the stopped ones are counted as cancelled (before, the path ran
        # through one of them).
        await program.acall(xs=[1, 2, 0])
    run = prof.last_run
    assert run is not None
    assert run.error is not None
    assert [step.path for step in run.critical_path] == ["stages[0].stage[2]"]
    summary = prof.get_performance_summary()
    assert [summary[f"stages[0].stage[{i}]"]["cancelled"] for i in range(3)] == [1, 1, 0]
    assert 0 < run.ideal_time <= run.wall
