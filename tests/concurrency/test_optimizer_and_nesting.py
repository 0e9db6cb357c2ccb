"""Optimizers see predictors inside fan-outs; fan-outs nest inside each other with full stage paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import EnsemblePipeline, ForEach, ParallelPipeline, ResultAggregator, SequentialPipeline
from stageflow.testing import FakeLM, call

# -- optimizer -------------------------------------------------------------------------------------

PREDICTOR_PATHS = [
    "stages[0].stage",
    "stages[1].stages[0]",
    "stages[1].stages[1]",
    "stages[2].processors[0]",
    "stages[2].processors[1].predict",
]


def program() -> SequentialPipeline:
    return SequentialPipeline(
        [
            ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts"),
            ParallelPipeline(
                [[dspy.Predict("question, facts -> summary"), dspy.Predict("question -> keywords")]]
            ),
            EnsemblePipeline(
                [
                    dspy.Predict("question, summary, keywords -> answer"),
                    dspy.ChainOfThought("question, summary -> answer"),
                ]
            ),
        ]
    )


TRAIN = [
    dspy.Example(question=f"q{i}", sub_questions=[f"a{i}", f"b{i}"], answer="42").with_inputs(
        "question", "sub_questions"
    )
    for i in range(4)
]


def metric(example: dspy.Example, pred: Any, trace: Any = None) -> bool:
    return bool(pred.answer == example.answer)


def teacher_lm() -> FakeLM:
    return FakeLM({"fact": "f", "summary": "s", "keywords": "k", "answer": "42", "reasoning": "r"})


def compile_program() -> tuple[SequentialPipeline, Any]:
    student = program()
    optimizer = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=3, max_labeled_demos=0)
    with dspy.context(lm=teacher_lm()):
        compiled = optimizer.compile(student, trainset=TRAIN)
    return student, compiled


def test_predictors_inside_fan_outs_are_visible_to_optimizers() -> None:
    assert [n for n, _ in program().named_predictors()] == PREDICTOR_PATHS


def test_bootstrap_gives_demos_to_predictors_inside_foreach_parallel_and_ensemble() -> None:
    student, compiled = compile_program()
    demos = {name: pred.demos for name, pred in compiled.named_predictors()}
    assert list(demos) == PREDICTOR_PATHS
    for name, ds in demos.items():
        assert len(ds) > 0, name
        assert all(d.get("augmented") for d in ds), name
    train_subs = {s for ex in TRAIN for s in ex.sub_questions}
    assert {d["sub_question"] for d in demos["stages[0].stage"]} <= train_subs
    assert all(d["fact"] == "f" for d in demos["stages[0].stage"])
    assert all(d["facts"] == ["f", "f"] for d in demos["stages[1].stages[0]"])
    assert all("keywords" in d for d in demos["stages[1].stages[1]"])
    assert all(d["answer"] == "42" for d in demos["stages[2].processors[0]"])
    assert all("reasoning" in d for d in demos["stages[2].processors[1].predict"])
    assert all(not p.demos for _, p in student.named_predictors())  # the student is left alone


async def test_trace_entries_from_every_branch_reach_settings_trace(mode: str) -> None:
    p = program()
    with dspy.context(lm=teacher_lm(), trace=[]):
        await call(p, mode, question="q", sub_questions=["a", "b", "c"])
        traced = [pred for pred, _, _ in dspy.settings.trace]
    by_id = {id(pred): name for name, pred in p.named_predictors()}
    names = sorted(by_id[id(t)] for t in traced)
    assert names == sorted([*["stages[0].stage"] * 3, *PREDICTOR_PATHS[1:]])


def test_compiled_program_saves_and_loads_into_a_fresh_instance(tmp_path: Path) -> None:
    _, compiled = compile_program()
    path = tmp_path / "compiled.json"
    compiled.save(str(path))
    assert [k for k in json.loads(path.read_text()) if k != "metadata"] == PREDICTOR_PATHS

    fresh = program()
    fresh.load(str(path))
    pairs = list(zip(compiled.named_predictors(), fresh.named_predictors(), strict=True))
    for (name_a, a), (name_b, b) in pairs:
        assert name_a == name_b
        assert a is not b
        assert len(b.demos) > 0
        assert [dict(d.items()) for d in a.demos] == [dict(d.items()) for d in b.demos]

    lm = teacher_lm()
    with dspy.context(lm=lm):
        result = fresh(question="q", sub_questions=["x", "y"])
    assert result.answer == "42"
    assert lm.calls == 2 + 2 + 2


# -- nesting ---------------------------------------------------------------------------------------------

SUBS = ["a", "b", "c", "d"]


def nested() -> SequentialPipeline:
    """Sequential[ Parallel[[topic, Ensemble[ForEach, ForEach, dissent]]], final ]."""
    dissent = stageflow.stage(lambda sub_questions: {"facts": ["wrong"]}, writes=["facts"], name="dissent")
    ensemble = EnsemblePipeline(
        [
            ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts"),
            ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts"),
            dissent,
        ],
        ResultAggregator(field="facts"),
    )
    topic = stageflow.stage(lambda question: {"topic": question.upper()}, writes=["topic"], name="topic")
    final = stageflow.stage(
        lambda topic, facts: {"answer": topic + ": " + ", ".join(facts)}, writes=["answer"], name="final"
    )
    return SequentialPipeline([ParallelPipeline([[topic, ensemble]]), final])


def expected_paths(n: int) -> list[str]:
    ens = "stages[0].stages[1]"
    paths = ["stages[0]", "stages[0].stages[0]", ens]
    for k in (0, 1):
        paths.append(f"{ens}.processors[{k}]")
        paths.extend(f"{ens}.processors[{k}].stage[{i}]" for i in range(n))
    paths.append(f"{ens}.processors[2]")
    paths.append("stages[1]")
    return paths


async def test_foreach_in_ensemble_in_parallel_in_sequential(mode: str) -> None:
    lm = FakeLM({"fact": lambda i: "f-" + i["sub_question"]}, rendezvous=8)
    p = nested()
    with dspy.context(lm=lm):
        result = await call(p, mode, question="q", sub_questions=SUBS)
    assert result.answer == "Q: f-a, f-b, f-c, f-d"
    assert result.facts == ["f-a", "f-b", "f-c", "f-d"]
    assert lm.calls == 8
    assert lm.peak_active == 8  # both ForEach members' items overlapped
    paths = [r.path for r in result.trace]
    assert "stages[0].stages[1].processors[0].stage[3]" in paths
    assert paths == expected_paths(len(SUBS))
    assert all(r.ok for r in result.trace)


async def test_nested_item_failure_names_the_full_path(mode: str) -> None:
    def fact(sub_question: str) -> dict[str, str]:
        if sub_question == "c":
            raise ValueError("no fact")
        return {"fact": sub_question}

    fe = ForEach(
        stageflow.stage(fact, writes=["fact"]), over="sub_questions", collect="facts", on_error="fail_fast"
    )
    p = SequentialPipeline(
        [
            stageflow.stage(lambda question: {"topic": "t"}, writes=["topic"]),
            ParallelPipeline([[EnsemblePipeline([fe], ResultAggregator(field="facts"))]]),
        ]
    )
    with pytest.raises(stageflow.PipelineError) as ei:
        await call(p, mode, question="q", sub_questions=SUBS)
    # The group's only stage (the ensemble) failed, because its only member failed fast.
    assert ei.value.code == "all_failed"
    assert ei.value.stage_path == "stages[1]"
    [ensemble_error] = ei.value.errors.values()
    assert isinstance(ensemble_error, stageflow.PipelineError)
    assert ensemble_error.stage_path == "stages[1].stages[0]"
    [item_error] = ensemble_error.errors.values()
    assert isinstance(item_error, stageflow.StageError)
    assert item_error.stage_path == "stages[1].stages[0].processors[0].stage[2]"
    assert isinstance(item_error.__cause__, ValueError)


async def test_nested_fan_outs_with_hooks_report_full_paths(mode: str) -> None:
    lm = FakeLM({"fact": "f"})
    with dspy.context(lm=lm), stageflow.profile() as prof:
        await call(nested(), mode, question="q", sub_questions=SUBS)
    summary = prof.get_performance_summary()
    assert set(summary) == set(expected_paths(len(SUBS)))
    assert all(s["num_executions"] == 1 for s in summary.values())
