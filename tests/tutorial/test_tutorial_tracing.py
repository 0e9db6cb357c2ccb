"""Tutorial "Monitoring and Debugging" §2 "Execution Tracing": ``TracingPipeline``.

The tutorial's ``TracingPipeline(stages)`` appends timestamped entries to ``execution_trace``: one
``{'type': 'input', 'stage': 'input', 'input': ...}``, per stage a ``stage_start`` (``stage``,
``stage_name``, ``input``) and a ``stage_end`` (``output``), and a final ``{'type': 'output',
'stage': 'output', 'output': ...}``; it returns ``result`` and ``execution_trace``;
``save_trace(filename)`` writes the trace as JSON (``default=str``). Its trace grows across calls;
stageflow's holds one call's events (the pipeline keeps the last call's).
"""

from __future__ import annotations

import json

import dspy
from monitored_stages import Draft, Review, writer_lm

from stageflow import SequentialPipeline, TracingPipeline, stage
from stageflow.testing import call


async def test_the_trace_records_the_input_each_stage_and_the_output(mode: str, tmp_path) -> None:
    pipeline = TracingPipeline([Draft(), Review()])
    with dspy.context(lm=writer_lm()):
        result = await call(pipeline, mode, topic="rivers")
    assert result.verdict == "accept"
    assert result.result["draft"] == "a draft about rivers"  # the tutorial's `result=current_input`
    trace = result.execution_trace
    assert len(trace) == 2 + 2 * len(pipeline.stages)
    assert [e["stage"] for e in trace[1:-1]] == [name for name in pipeline.stage_names for _ in (0, 1)]
    assert "execution_trace" not in result

    path = tmp_path / "trace.json"
    pipeline.save_trace(str(path))
    assert json.loads(path.read_text())  # plain JSON (the tutorial: json.dump(..., default=str))


async def test_each_call_has_its_own_trace(mode: str) -> None:
    pipeline = TracingPipeline([Draft(), Review()])
    with dspy.context(lm=writer_lm()):
        first = await call(pipeline, mode, topic="rivers")
        second = await call(pipeline, mode, topic="lakes")
    assert len(first.execution_trace) == len(second.execution_trace) == 6
    assert pipeline.execution_trace == second.execution_trace


async def test_trace_entries_have_the_tutorials_keys(mode: str) -> None:
    pipeline = TracingPipeline([Draft(), Review()])
    with dspy.context(lm=writer_lm()):
        result = await call(pipeline, mode, topic="rivers")
    trace = result.execution_trace
    assert [e["type"] for e in trace] == [
        "input",
        "stage_start",
        "stage_end",
        "stage_start",
        "stage_end",
        "output",
    ]
    assert [e["stage"] for e in trace] == ["input", "stage_0", "stage_0", "stage_1", "stage_1", "output"]
    assert trace[0]["input"] == {"topic": "rivers"}
    assert trace[1]["input"] == {"topic": "rivers"}
    assert trace[1]["stage_name"]
    assert trace[2]["output"]["draft"] == "a draft about rivers"
    assert trace[-1]["output"]["verdict"] == "accept"
    assert all(isinstance(e["timestamp"], float) for e in trace)


async def test_save_trace_writes_the_trace_entries(mode: str, tmp_path) -> None:
    pipeline = TracingPipeline([Draft(), Review()])
    with dspy.context(lm=writer_lm()):
        result = await call(pipeline, mode, topic="rivers")
    path = tmp_path / "trace.json"
    pipeline.save_trace(str(path))
    saved = json.loads(path.read_text())
    assert isinstance(saved, list)
    assert [e["stage"] for e in saved] == [e["stage"] for e in result.execution_trace]


async def test_a_nested_tracing_pipeline_traces_as_it_does_alone(mode: str) -> None:
    alone = TracingPipeline([Draft(), Review()])
    inner = TracingPipeline([Draft(), Review()])
    outer = SequentialPipeline([stage(lambda topic: {"topic": topic}, writes=["topic"]), inner])
    with dspy.context(lm=writer_lm()):
        expected = (await call(alone, mode, topic="rivers")).execution_trace
        for _ in range(2):  # (a nested pipeline's later calls may run in line)
            result = await call(outer, mode, topic="rivers")
    nested = result.details["stages[1]"]["execution_trace"]
    keys = ("type", "stage", "stage_name")
    assert [tuple(e.get(k) for k in keys) for e in nested] == [
        tuple(e.get(k) for k in keys) for e in expected
    ]
    assert nested[0]["type"] == "input"
    assert nested[-1]["type"] == "output"
    assert nested[1]["path"] == "stages[1].stages[0]"  # (the full path is kept beside it)
