"""Tutorial "Monitoring and Debugging" §1 "Performance Profiling": ``ProfilingPipeline``.

The tutorial's ``ProfilingPipeline(stages)`` runs its stages in order, records each stage's
execution time under ``profile_data[f"stage_{i}"]`` and ``(input_size, output_size)`` under
``profile_data[f"stage_{i}_sizes"]``, returns ``result`` and ``profile_data``, and
``get_performance_summary()`` gives per stage ``avg_time``, ``total_time``, ``num_executions``,
``min_time``, ``max_time`` over every call so far.
"""

from __future__ import annotations

import dspy
import pytest
from monitored_stages import Draft, Review, writer_lm

from stageflow import ProfilingPipeline, SequentialPipeline, stage
from stageflow.testing import call


async def test_the_performance_summary_covers_every_call(mode: str) -> None:
    pipeline = ProfilingPipeline([Draft(), Review()])
    with dspy.context(lm=writer_lm()):
        first = await call(pipeline, mode, topic="rivers")
        second = await call(pipeline, mode, topic="lakes")
    assert second.verdict == "accept"
    assert second.result["draft"] == "a draft about lakes"  # the tutorial's `result=current_input`
    summary = pipeline.get_performance_summary()
    assert list(summary) == pipeline.stage_names
    for stats in summary.values():
        assert stats["num_executions"] == 2
        assert 0 <= stats["min_time"] <= stats["avg_time"] <= stats["max_time"]
        assert stats["total_time"] == pytest.approx(2 * stats["avg_time"])
    # profile_data: a run detail of each call, not a data field
    names = set(pipeline.stage_names)
    assert set(first.profile_data) == names | {f"{n}_sizes" for n in names}  # the tutorial's layout
    assert "profile_data" not in first


async def test_profile_data_has_the_tutorials_layout(mode: str) -> None:
    pipeline = ProfilingPipeline([Draft(), Review()])
    with dspy.context(lm=writer_lm()):
        result = await call(pipeline, mode, topic="rivers")
    times = result.profile_data["stage_0"]
    assert len(times) == 1
    assert times[0] >= 0
    [(input_size, output_size)] = result.profile_data["stage_0_sizes"]
    # The tutorial's sizes: len(str(...)) of the stage's inputs and of its outputs as a dict.
    assert input_size == len(str({"topic": "rivers"}))
    assert output_size == len(str({"draft": result.draft}))
    assert set(pipeline.get_performance_summary()) == {"stage_0", "stage_1"}


async def test_a_nested_profiling_pipeline_names_its_stages_as_it_does_alone(mode: str) -> None:
    # Used as a stage of another pipeline (at any slot), it keeps the tutorial's stage_0, stage_1...
    inner = ProfilingPipeline([Draft(), Review()])
    outer = SequentialPipeline([stage(lambda topic: {"topic": topic.upper()}, writes=["topic"]), inner])
    with dspy.context(lm=writer_lm()):
        result = await call(outer, mode, topic="rivers")
        await call(outer, mode, topic="lakes")  # (a nested pipeline's later calls may run in line)
    names = inner.stage_names
    assert sorted(result.details["stages[1]"]["profile_data"]) == sorted(
        [*names, *(f"{n}_sizes" for n in names)]
    )
    summary = inner.get_performance_summary()
    assert list(summary) == names
    assert all(stats["num_executions"] == 2 for stats in summary.values())
