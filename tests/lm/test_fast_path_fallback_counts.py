"""A prompt the fast path leaves to DSPy's adapter is counted for its stage: in the run's usage, in
profiles (and their table), in traces and in OpenTelemetry attributes."""

from __future__ import annotations

import datetime

import dspy
import pytest

import stageflow
from stageflow.lm.fast import fast_path_stats, reset_fast_path_stats
from stageflow.observe.otel_attributes import usage_attributes
from stageflow.testing import FakeLM, call


class WhenSig(dspy.Signature):
    """Say when."""

    question: str = dspy.InputField()
    when: datetime.date = dspy.OutputField()  # a type the fast path does not cover


def pipeline() -> stageflow.SequentialPipeline:
    return stageflow.SequentialPipeline([dspy.Predict(WhenSig), dspy.Predict("when -> answer")])


def lm() -> FakeLM:
    return FakeLM({"when": "2024-01-02", "answer": "ok"})


async def test_the_run_usage_counts_the_fallback_of_its_stage(mode: str) -> None:
    reset_fast_path_stats()
    with dspy.context(lm=lm()):
        result = await call(pipeline(), mode, question="q")
    assert result.when == datetime.date(2024, 1, 2)
    assert result.run.usage["stages[0]"].fast_fallbacks == 1
    assert result.run.usage["stages[1]"].fast_fallbacks == 0
    assert result.run.usage.total.fast_fallbacks == 1
    assert fast_path_stats().fallback_calls == 1  # the process-wide count, with the reason


async def test_a_profile_counts_fallbacks_per_stage_and_shows_the_column(mode: str) -> None:
    p = pipeline()
    with dspy.context(lm=lm()), stageflow.profile() as prof:
        await call(p, mode, question="q")
        await call(p, mode, question="r")
    summary = prof.get_performance_summary()
    assert summary["stages[0]"]["fast_fallbacks"] == 2
    assert summary["stages[1]"]["fast_fallbacks"] == 0
    assert prof.totals()["fast_fallbacks"] == 2
    table = prof.table()
    header, first = table.splitlines()[:2]
    assert "DSPy adapter" in header
    assert first.split()[0] == "stages[0]"
    assert first.split()[-2] == "2"
    assert "fast_path_stats()" in table


def test_the_column_is_left_out_when_every_prompt_took_the_fast_path() -> None:
    p = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=FakeLM({"answer": "ok"})), stageflow.profile() as prof:
        p(question="q")
    assert "DSPy adapter" not in prof.table()
    assert prof.get_performance_summary()["stages[0]"]["fast_fallbacks"] == 0


def test_a_pipeline_with_the_fast_path_off_counts_no_fallback() -> None:
    p = pipeline()
    p.fast_path = False  # DSPy's adapter by choice: nothing was left to it
    with dspy.context(lm=lm()):
        result = p(question="q")
    assert result.run.usage.total.fast_fallbacks == 0


def test_traces_carry_the_count_in_the_stage_usage() -> None:
    with dspy.context(lm=lm()), stageflow.trace() as t:
        pipeline()(question="q")
    ends = [e for e in t.events if e["event"] == "stage_end"]
    assert [e["usage"]["fast_fallbacks"] for e in ends] == [1, 0]


@pytest.mark.parametrize(("count", "expected"), [(0, None), (3, 3)])
def test_open_telemetry_attributes_name_the_count_when_there_is_one(count: int, expected: int | None) -> None:
    attrs = usage_attributes({"lm_calls": 3, "fast_fallbacks": count}, carrier=True)
    assert attrs.get("stageflow.usage.fast_fallbacks") == expected
