"""Declared degradations: a cheaper LM, fewer ensemble members, skipped stages — recorded in events."""

from __future__ import annotations

import dspy
import pytest
from budget_kit import FakeClock

import stageflow
from stageflow.budgets import Degrade, LMBudget
from stageflow.testing import FakeLM, call


def chain(n: int) -> stageflow.SequentialPipeline:
    names = ["question", *[f"step{i}" for i in range(n)]]
    return stageflow.SequentialPipeline([dspy.Predict(f"{names[i]} -> {names[i + 1]}") for i in range(n)])


async def test_a_cheaper_lm_takes_over_past_the_threshold(mode: str) -> None:
    main = FakeLM({"step0": "big", "step1": "big", "step2": "big", "step3": "big"}, model="fake/big")
    cheap = FakeLM(
        {"step0": "small", "step1": "small", "step2": "small", "step3": "small"}, model="fake/small"
    )
    limits = LMBudget(max_calls=4, degrade=Degrade(at=0.5, lm=cheap))
    pipe = chain(4).set_budget(limits)
    with dspy.context(lm=main):
        result = await call(pipe, mode, question="q")
    assert [result[f"step{i}"] for i in range(4)] == ["big", "big", "small", "small"]
    assert (main.calls, cheap.calls) == (2, 2)
    degraded = [e for e in result.run.events if e.kind == "budget_degraded"]
    assert len(degraded) == 1
    assert degraded[0].stage == "stages[1]"  # the call that crossed half of max_calls
    assert degraded[0].detail["lm"] == "fake/small"
    assert degraded[0].detail["budget"] == "the run budget of SequentialPipeline"
    assert degraded[0].detail["spent"]["calls"] == 2


async def test_stages_listed_to_skip_do_not_run_once_degraded(mode: str) -> None:
    lm = FakeLM()
    pipe = stageflow.SequentialPipeline(
        [
            dspy.Predict("question -> answer"),
            dspy.Predict("answer -> draft"),
            dspy.Predict("answer -> critique"),
        ]
    )
    limits = LMBudget(max_calls=10, degrade=Degrade(at=0.2, skip=["stages[2]"]))
    with dspy.context(lm=lm), stageflow.budget(limits) as spent:
        result = await call(pipe, mode, question="q")
    assert "critique" not in result
    assert result.draft == "ok"
    assert lm.calls == 2
    kinds = [(e.kind, e.stage) for e in result.run.events]
    assert kinds == [("budget_degraded", "stages[1]"), ("budget_skipped", "stages[2]")]
    assert [e.kind for e in spent.events] == ["budget_degraded", "budget_skipped"]


async def test_wildcards_skip_nested_stages(mode: str) -> None:
    lm = FakeLM()
    inner = stageflow.SequentialPipeline([dspy.Predict("answer -> note"), dspy.Predict("answer -> extra")])
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer"), inner])
    limits = LMBudget(max_calls=2, degrade=Degrade(at=0.5, skip=["*extra*", "stages[1].stages[1]"]))
    with dspy.context(lm=lm), stageflow.budget(limits):
        result = await call(pipe, mode, question="q")
    assert result.note == "ok"
    assert "extra" not in result
    assert [e.stage for e in result.run.events if e.kind == "budget_skipped"] == ["stages[1].stages[1]"]


async def test_an_ensemble_starts_fewer_members_once_degraded(mode: str) -> None:
    lm = FakeLM({"answer": "x"})
    members = [dspy.Predict("question -> answer") for _ in range(4)]
    ensemble = stageflow.EnsemblePipeline(members, stageflow.ResultAggregator("majority"))
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> topic"), ensemble])
    limits = LMBudget(max_calls=10, degrade=Degrade(at=0.1, max_members=2))
    with dspy.context(lm=lm), stageflow.budget(limits):
        result = await call(pipe, mode, question="q")
    assert result.answer == "x"
    assert lm.calls == 1 + 2
    trimmed = [e for e in result.run.events if e.kind == "budget_members"]
    assert [(e.stage, e.detail["ran"], e.detail["of"]) for e in trimmed] == [("stages[1]", 2, 4)]
    assert len(result.run.details["stages[1]"]["individual_results"]) == 2


async def test_time_can_cross_the_threshold(mode: str) -> None:
    clock = FakeClock()
    lm = FakeLM()
    pipe = stageflow.SequentialPipeline(
        [
            dspy.Predict("question -> answer"),
            stageflow.stage(lambda answer: clock.advance(9) or {"slow": 1}, writes=["slow"]),
            dspy.Predict("answer -> polish"),
        ]
    )
    limits = LMBudget(max_seconds=10, clock=clock, degrade=Degrade(at=0.8, skip=["stages[2]"]))
    with dspy.context(lm=lm), stageflow.budget(limits) as spent:
        result = await call(pipe, mode, question="q")
    assert "polish" not in result
    assert spent.degraded
    assert [e.kind for e in result.run.events] == ["budget_degraded", "budget_skipped"]


def test_no_degradation_below_the_threshold() -> None:
    lm = FakeLM()
    limits = LMBudget(max_calls=100, degrade=Degrade(at=0.9, skip=["stages[1]"]))
    with dspy.context(lm=lm), stageflow.budget(limits) as spent:
        result = chain(2)(question="q")
    assert result.step1 == "ok"
    assert not spent.degraded
    assert result.run.events == []


def test_a_degradation_stays_within_its_budget() -> None:
    lm = FakeLM()
    limits = LMBudget(max_calls=2, degrade=Degrade(at=0.5, skip=["stages[1]"]))
    with dspy.context(lm=lm):
        with stageflow.budget(limits):
            chain(1)(question="q")
        result = chain(2)(question="q")  # after the block: no budget, nothing skipped
    assert result.step1 == "ok"


@pytest.mark.parametrize("at", [0.5, 1.0])
def test_the_budget_still_refuses_past_its_limit(at: float) -> None:
    lm = FakeLM()
    cheap = FakeLM(model="fake/cheap")
    limits = LMBudget(max_calls=2, degrade=Degrade(at=at, lm=cheap))
    with dspy.context(lm=lm), stageflow.budget(limits), pytest.raises(stageflow.BudgetExceeded):
        chain(3)(question="q")
    assert lm.calls + cheap.calls == 2
