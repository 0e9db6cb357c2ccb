"""Optimizers: BootstrapFewShot on a nested pipeline, save/load, deepcopy, no copies inside forward."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.utils import DummyLM

from stageflow import BranchingPipeline, IterativePipeline, SequentialPipeline, Stage
from stageflow.testing import FakeLM, call

PATHS = ["stages[0]", "stages[1].branches['math']", "stages[1].branches['chat'].predict"]


def build() -> SequentialPipeline:
    return SequentialPipeline(
        [
            dspy.Predict("question -> draft"),
            BranchingPipeline(
                lambda question: "math" if any(c.isdigit() for c in question) else "chat",
                {
                    "math": dspy.Predict("question, draft -> answer"),
                    "chat": dspy.ChainOfThought("question, draft -> answer"),
                },
            ),
        ]
    )


TRAIN = [
    dspy.Example(question="what is 1+1?", answer="4").with_inputs("question"),
    dspy.Example(question="what is 2+2?", answer="4").with_inputs("question"),
    dspy.Example(question="hello there", answer="4").with_inputs("question"),
    dspy.Example(question="how are you", answer="4").with_inputs("question"),
]


def metric(example: dspy.Example, pred: Any, trace: Any = None) -> bool:
    return bool(pred.answer == example.answer)


def compile_with(lm: Any) -> tuple[SequentialPipeline, Any]:
    program = build()
    optimizer = dspy.BootstrapFewShot(metric=metric, max_bootstrapped_demos=4, max_labeled_demos=0)
    with dspy.context(lm=lm):
        compiled = optimizer.compile(program, trainset=TRAIN)
    return program, compiled


@pytest.mark.parametrize("lm_kind", ["fake", "dummy"])
def test_bootstrap_puts_demos_on_every_executed_predictor(lm_kind: str) -> None:
    if lm_kind == "fake":
        lm: Any = FakeLM({"draft": "d", "reasoning": "r", "answer": "4"})
    else:
        lm = DummyLM([{"draft": "d", "reasoning": "r", "answer": "4"}] * 50)
    program, compiled = compile_with(lm)

    assert [n for n, _ in compiled.named_predictors()] == PATHS
    demos = {name: pred.demos for name, pred in compiled.named_predictors()}
    assert len(demos["stages[0]"]) == 4
    assert len(demos["stages[1].branches['math']"]) == 2
    assert len(demos["stages[1].branches['chat'].predict"]) == 2
    for name, ds in demos.items():
        assert all(d.get("augmented") for d in ds), name
    math_questions = {d["question"] for d in demos["stages[1].branches['math']"]}
    assert math_questions == {"what is 1+1?", "what is 2+2?"}
    assert all("draft" in d and "answer" in d for d in demos["stages[1].branches['math']"])
    assert all("reasoning" in d for d in demos["stages[1].branches['chat'].predict"])

    # The student passed in is left alone.
    assert all(not p.demos for _, p in program.named_predictors())
    assert compiled is not program


def test_compiled_pipeline_still_runs_and_sends_demos() -> None:
    lm = FakeLM({"draft": "d", "reasoning": "r", "answer": "4"})
    _, compiled = compile_with(lm)
    before = lm.calls
    with dspy.context(lm=lm):
        result = compiled(question="what is 3+3?")
    assert result.answer == "4"
    assert result.branch == "math"
    assert lm.calls == before + 2


def test_save_json_and_load_into_fresh_pipeline_round_trips_demos(tmp_path: Path) -> None:
    _, compiled = compile_with(FakeLM({"draft": "d", "reasoning": "r", "answer": "4"}))
    path = tmp_path / "compiled.json"
    compiled.save(str(path))
    saved = json.loads(path.read_text())
    assert [k for k in saved if k != "metadata"] == PATHS

    fresh = build()
    fresh.load(str(path))
    for (name_a, a), (name_b, b) in zip(compiled.named_predictors(), fresh.named_predictors(), strict=True):
        assert name_a == name_b
        assert a is not b
        assert [dict(d.items()) for d in a.demos] == [dict(d.items()) for d in b.demos]
        assert len(b.demos) > 0


def test_deepcopy_gives_distinct_predictors_with_same_names() -> None:
    program = build()
    program.stages[0].demos = [dspy.Example(question="q", draft="d")]
    copy = program.deepcopy()
    original = program.named_predictors()
    copied = copy.named_predictors()
    assert [n for n, _ in original] == [n for n, _ in copied] == PATHS
    for (_, a), (_, b) in zip(original, copied, strict=True):
        assert a is not b
        assert a.signature.equals(b.signature)
    assert len(copy.stages[0].demos) == 1
    copy.stages[0].demos.append(dspy.Example(question="q2", draft="d2"))
    assert len(program.stages[0].demos) == 1


async def test_deepcopy_runs_its_own_predictors(mode: str) -> None:
    program = build()
    copy = program.deepcopy()
    lm = FakeLM({"draft": "d", "answer": "a"})
    with dspy.context(lm=lm, trace=[]):
        await call(copy, mode, question="1+1")
        used = {id(pred) for pred, _, _ in dspy.settings.trace}
    assert used == {id(copy.stages[0]), id(copy.stages[1].branches["math"])}
    assert not used & {id(p) for p in program.predictors()}


def test_reset_copy_keeps_structure() -> None:
    program = build()
    program.stages[0].demos = [dspy.Example(question="q", draft="d")]
    fresh = program.reset_copy()
    assert [n for n, _ in fresh.named_predictors()] == PATHS
    assert all(not p.demos for p in fresh.predictors())
    assert len(program.stages[0].demos) == 1


async def test_no_deepcopy_inside_forward(mode: str) -> None:
    program = build()
    lm = FakeLM({"draft": "d", "answer": "a", "reasoning": "r"})
    ids_by_name = {name: id(p) for name, p in program.named_predictors()}
    with dspy.context(lm=lm, trace=[]):
        await call(program, mode, question="1+1")
        await call(program, mode, question="2+2")
        await call(program, mode, question="hello")
        traced = [pred for pred, _, _ in dspy.settings.trace]
    assert [id(p) for p in traced] == [
        ids_by_name["stages[0]"],
        ids_by_name["stages[1].branches['math']"],
        ids_by_name["stages[0]"],
        ids_by_name["stages[1].branches['math']"],
        ids_by_name["stages[0]"],
        ids_by_name["stages[1].branches['chat'].predict"],
    ]


async def test_loop_reuses_the_same_predictor_each_iteration(mode: str) -> None:
    refine = dspy.Predict("previous -> draft")
    loop = IterativePipeline([Stage(refine, inputs={"previous": "draft"})], lambda s: False, max_iterations=3)
    lm = FakeLM({"draft": lambda i: i["previous"] + "."})
    with dspy.context(lm=lm, trace=[]):
        result = await call(loop, mode, draft="x")
        traced = [pred for pred, _, _ in dspy.settings.trace]
    assert result.draft == "x..."
    assert len(traced) == 3
    assert all(p is refine for p in traced)
    assert [n for n, _ in loop.named_predictors()] == ["stages[0].module"]


def test_evaluate_runs_pipeline_with_example_inputs() -> None:
    lm = FakeLM({"draft": "d", "reasoning": "r", "answer": "4"})
    evaluate = dspy.Evaluate(devset=TRAIN, metric=metric, num_threads=2, display_progress=False)
    with dspy.context(lm=lm):
        outcome = evaluate(build())
    assert outcome.score == 100.0
