"""Observers: profile(), trace(), ProfilingPipeline, TracingPipeline, hooks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import (
    BranchingPipeline,
    Hook,
    IterativePipeline,
    ProfilingPipeline,
    SequentialPipeline,
    StageError,
    TracingPipeline,
    attach_hooks,
    stage,
)
from stageflow.engine.hooks import current_path
from stageflow.testing import FakeLM, call


def nested() -> SequentialPipeline:
    inner = SequentialPipeline(
        [stage(lambda x: {"y": x + 1}, writes=["y"]), stage(lambda y: {"z": y * 2}, writes=["z"])]
    )
    return SequentialPipeline([stage(lambda x: {"w": x}, writes=["w"]), inner])


NESTED_EVENTS = [
    ("input", ""),
    ("stage_start", "stages[0]"),
    ("stage_end", "stages[0]"),
    ("stage_start", "stages[1]"),
    ("input", "stages[1]"),
    ("stage_start", "stages[1].stages[0]"),
    ("stage_end", "stages[1].stages[0]"),
    ("stage_start", "stages[1].stages[1]"),
    ("stage_end", "stages[1].stages[1]"),
    ("output", "stages[1]"),
    ("stage_end", "stages[1]"),
    ("output", ""),
]


async def test_profile_summary_per_stage_path_including_nested(mode: str) -> None:
    p = nested()
    with stageflow.profile() as prof:
        await call(p, mode, x=1)
        await call(p, mode, x=2)
    summary = prof.get_performance_summary()
    assert set(summary) == {"stages[0]", "stages[1]", "stages[1].stages[0]", "stages[1].stages[1]"}
    assert all(s["num_executions"] == 2 for s in summary.values())
    assert all(s["errors"] == 0 for s in summary.values())
    for s in summary.values():
        assert s["min_time"] <= s["avg_time"] <= s["max_time"]
        assert s["total_time"] == pytest.approx(s["avg_time"] * 2)
    # A nested pipeline's time includes its children.
    children = summary["stages[1].stages[0]"]["total_time"] + summary["stages[1].stages[1]"]["total_time"]
    assert summary["stages[1]"]["total_time"] >= children
    assert prof.runs == 2


def test_profile_counts_loop_iterations_and_branch_paths() -> None:
    loop = IterativePipeline(
        [stage(lambda n=0: n + 1, writes=["n"])], lambda s: s["n"] >= 3, max_iterations=5
    )
    p = SequentialPipeline([BranchingPipeline(lambda q: "a", {"a": loop})])
    with stageflow.profile() as prof:
        p(q="x")
    summary = prof.get_performance_summary()
    assert summary["stages[0].branches['a'].stages[0]"]["num_executions"] == 3
    assert summary["stages[0].router"]["num_executions"] == 1
    assert summary["stages[0].branches['a']"]["num_executions"] == 1


def test_profile_records_errors_and_reset() -> None:
    def boom(x: int) -> dict[str, Any]:
        raise ValueError("no")

    p = SequentialPipeline([stage(boom, writes=["y"])])
    with stageflow.profile() as prof, pytest.raises(StageError):
        p(x=1)
    assert prof.get_performance_summary()["stages[0]"]["errors"] == 1
    prof.reset()
    assert prof.get_performance_summary() == {}
    assert prof.runs == 0


def test_profile_is_off_outside_the_block() -> None:
    p = nested()
    with stageflow.profile() as prof:
        p(x=1)
    p(x=1)
    assert prof.get_performance_summary()["stages[0]"]["num_executions"] == 1


async def test_trace_event_order(mode: str) -> None:
    p = SequentialPipeline([stage(lambda x: {"y": x + 1}, writes=["y"])])
    with stageflow.trace() as tracer:
        await call(p, mode, x=1)
    assert [e["event"] for e in tracer.events] == ["input", "stage_start", "stage_end", "output"]
    start, end = tracer.events[1], tracer.events[2]
    assert start["inputs"] == {"x": 1}
    assert end["outputs"] == {"y": 2}
    assert tracer.events[-1]["outputs"] == {"x": 1, "y": 2}
    times = [e["t"] for e in tracer.events]
    assert times == sorted(times)
    assert all(e["timestamp"].endswith("+00:00") for e in tracer.events)


async def test_trace_nested_paths(mode: str) -> None:
    with stageflow.trace() as tracer:
        await call(nested(), mode, x=1)
    assert [(e["event"], e["stage"]) for e in tracer.events] == NESTED_EVENTS


async def test_async_runs_produce_the_same_events_as_sync() -> None:
    p = nested()
    with stageflow.trace() as sync_tracer:
        p(x=1)
    with stageflow.trace() as async_tracer:
        await p.acall(x=1)
    strip = [(e["event"], e["stage"], e.get("inputs"), e.get("outputs")) for e in sync_tracer.events]
    assert strip == [(e["event"], e["stage"], e.get("inputs"), e.get("outputs")) for e in async_tracer.events]


async def test_trace_stage_error_events(mode: str) -> None:
    def boom(x: int) -> dict[str, Any]:
        raise ValueError("no")

    p = SequentialPipeline(
        [stage(lambda x: {"w": x}, writes=["w"]), SequentialPipeline([stage(boom, writes=["k"])])]
    )
    with stageflow.trace() as tracer, pytest.raises(StageError):
        await call(p, mode, x=1)
    events = [(e["event"], e["stage"]) for e in tracer.events]
    assert events == [
        ("input", ""),
        ("stage_start", "stages[0]"),
        ("stage_end", "stages[0]"),
        ("stage_start", "stages[1]"),
        ("input", "stages[1]"),
        ("stage_start", "stages[1].stages[0]"),
        ("stage_error", "stages[1].stages[0]"),
        ("output", "stages[1]"),
        ("stage_error", "stages[1]"),
        ("output", ""),
    ]
    assert (
        tracer.events[6]["error"]
        == "StageError: Stage 'stages[1].stages[0]' (function boom()) raised ValueError: no"
    )
    assert tracer.events[-1]["error"].startswith("StageError: Stage 'stages[1].stages[0]'")


def test_tracer_record_content_off() -> None:
    with stageflow.trace(record_content=False) as tracer:
        nested()(x=1)
    assert all("inputs" not in e and "outputs" not in e for e in tracer.events)


def test_tracer_save_writes_valid_json(tmp_path: Path) -> None:
    with stageflow.trace() as tracer:
        nested()(x=1)
    target = tracer.save(tmp_path / "sub" / "trace.json")
    assert target == tmp_path / "sub" / "trace.json"
    data = json.loads(target.read_text())
    assert [(e["event"], e["stage"]) for e in data["events"]] == NESTED_EVENTS
    assert list(tmp_path.joinpath("sub").iterdir()) == [target]


async def test_profiling_pipeline_aggregates_and_result_profile_is_per_call(mode: str) -> None:
    inner = SequentialPipeline([stage(lambda w: {"y": w + 1}, writes=["y"])])
    pp = ProfilingPipeline([stage(lambda x: {"w": x}, writes=["w"]), inner])
    first = await call(pp, mode, x=1)
    second = await call(pp, mode, x=2)
    assert first.y == 2
    assert second.y == 3
    for result in (first, second):
        assert set(result.profile_data) == {"stages[0]", "stages[1]", "stages[1].stages[0]"}
        assert all(s["num_executions"] == 1 for s in result.profile_data.values())
        assert "profile_data" not in list(result.keys())
    total = pp.get_performance_summary()
    assert all(s["num_executions"] == 2 for s in total.values())
    assert pp.profiler.runs == 2
    pp.reset()
    assert pp.get_performance_summary() == {}


async def test_tracing_pipeline_execution_trace_and_save(mode: str, tmp_path: Path) -> None:
    tp = TracingPipeline([stage(lambda x: {"w": x}, writes=["w"])])
    first = await call(tp, mode, x=1)
    second = await call(tp, mode, x=2)
    expected = ["input", "stage_start", "stage_end", "output"]
    assert [e["event"] for e in first.execution_trace] == expected
    assert [e["event"] for e in second.execution_trace] == expected
    assert first.execution_trace[0]["inputs"] == {"x": 1}
    saved = json.loads(tp.save_trace(tmp_path / "t.json").read_text())
    assert saved["events"][0]["inputs"] == {"x": 2}
    assert len(saved["events"]) == 4


class Recorder(Hook):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.paths_inside: list[str] = []

    def on_run_start(self, *, path: str, **future: Any) -> None:
        self.calls.append(("run_start", path))

    def on_run_end(self, *, path: str, error: BaseException | None, **future: Any) -> None:
        self.calls.append(("run_end" if error is None else "run_error", path))

    def before_stage(self, *, path: str, **future: Any) -> None:
        self.calls.append(("before", path))

    def after_stage(self, *, path: str, **future: Any) -> None:
        self.calls.append(("after", path))

    def on_stage_error(self, *, path: str, **future: Any) -> None:
        self.calls.append(("error", path))


class Exploding(Hook):
    def on_run_start(self, **future: Any) -> None:
        raise RuntimeError("hook failure")

    def before_stage(self, **future: Any) -> None:
        raise RuntimeError("hook failure")

    def after_stage(self, **future: Any) -> None:
        raise RuntimeError("hook failure")

    def on_run_end(self, **future: Any) -> None:
        raise RuntimeError("hook failure")


async def test_raising_hook_is_ignored(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    recorder = Recorder()
    with caplog.at_level(logging.WARNING, logger="stageflow"), attach_hooks(Exploding(), recorder):
        result = await call(nested(), mode, x=1)
    assert result.z == 4
    assert ("after", "stages[1].stages[1]") in recorder.calls
    failures = [r for r in caplog.records if r.exc_info and "hook failure" in str(r.exc_info[1])]
    assert failures


async def test_hooks_see_full_nested_paths(mode: str) -> None:
    recorder = Recorder()
    p = SequentialPipeline(
        [
            stage(lambda q: {"a": 1}, writes=["a"]),
            BranchingPipeline(
                lambda q: "x", {"x": SequentialPipeline([stage(lambda a: {"b": a}, writes=["b"])])}
            ),
        ]
    )
    with attach_hooks(recorder):
        await call(p, mode, q="?")
    assert recorder.calls == [
        ("run_start", ""),
        ("before", "stages[0]"),
        ("after", "stages[0]"),
        ("before", "stages[1]"),
        ("run_start", "stages[1]"),
        ("before", "stages[1].router"),
        ("after", "stages[1].router"),
        ("before", "stages[1].branches['x']"),
        ("run_start", "stages[1].branches['x']"),
        ("before", "stages[1].branches['x'].stages[0]"),
        ("after", "stages[1].branches['x'].stages[0]"),
        ("run_end", "stages[1].branches['x']"),
        ("after", "stages[1].branches['x']"),
        ("run_end", "stages[1]"),
        ("after", "stages[1]"),
        ("run_end", ""),
    ]


async def test_current_path_inside_a_stage(mode: str) -> None:
    seen: list[str] = []

    def probe(a: int) -> dict[str, Any]:
        seen.append(current_path())
        return {"b": a}

    p = SequentialPipeline(
        [stage(lambda q: {"a": 1}, writes=["a"]), SequentialPipeline([stage(probe, writes=["b"])])]
    )
    with attach_hooks(Hook()):
        await call(p, mode, q=1)
    assert seen == ["stages[1].stages[0]"]


def test_hooks_inactive_outside_attach() -> None:
    recorder = Recorder()
    with attach_hooks(recorder):
        pass
    nested()(x=1)
    assert recorder.calls == []


async def test_hooks_see_lm_stage_inputs_and_outputs(mode: str) -> None:
    lm = FakeLM({"answer": "42"})
    p = SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=lm), stageflow.trace() as tracer:
        await call(p, mode, question="Q")
    end = next(e for e in tracer.events if e["event"] == "stage_end")
    start = next(e for e in tracer.events if e["event"] == "stage_start")
    assert start["inputs"] == {"question": "Q"}
    assert start["stage_type"] == "Predict"
    assert end["outputs"] == {"answer": "42"}


def test_nested_profiling_pipeline_paths_do_not_depend_on_other_observers() -> None:
    pp = ProfilingPipeline([stage(lambda a: {"b": a}, writes=["b"])])
    outer = SequentialPipeline([stage(lambda a: {"z": a}, writes=["z"]), pp])
    outer(a=1)
    alone = (sorted(pp.get_performance_summary()), pp.profiler.runs)
    pp.reset()
    with stageflow.trace():
        outer(a=1)
    observed = (sorted(pp.get_performance_summary()), pp.profiler.runs)
    assert alone == observed


def test_trace_error_texts_name_the_failing_stage_by_full_path() -> None:
    def boom(x: int) -> dict[str, Any]:
        raise ValueError("no")

    p = SequentialPipeline(
        [stage(lambda x: {"w": x}, writes=["w"]), SequentialPipeline([stage(boom, writes=["k"])])]
    )
    with stageflow.trace() as tracer, pytest.raises(StageError):
        p(x=1)
    stage_errors = [e["error"] for e in tracer.events if "error" in e and e["error"].startswith("StageError")]
    # stage_error and output events of the inner and the outer pipeline: 4, each naming the leaf
    assert len(stage_errors) == 4
    assert all("'stages[1].stages[0]'" in text for text in stage_errors)
