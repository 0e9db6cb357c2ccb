"""A stage called on its own without a required input fails as a pipeline would, before it runs.

Before: ``Stage(module)(question=...)`` without ``context`` raised a bare ``TypeError`` from the
module, ``Stage(dspy.Predict(...))`` sent the LM a prompt without the field (DSPy only warns), and a
function stage raised Python's ``TypeError``. Now each is a ``ContractError`` (code
``missing_input``) naming the stage and the field as the caller passes it; nothing is called.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ContractError, SequentialPipeline, Stage, stage
from stageflow.testing import FakeLM, call


class Reader(dspy.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, question: str, context: str) -> dspy.Prediction:
        self.calls += 1
        return dspy.Prediction(answer=f"{question}/{context}")


def _check(err: ContractError, field: str, where: str) -> None:
    assert err.code == "missing_input"
    assert err.field == field
    assert where in str(err)
    assert f"needs input '{field}'" in str(err)


def test_a_stage_around_a_module(mode: str) -> None:
    module = Reader()
    with pytest.raises(ContractError) as info:
        asyncio.run(call(Stage(module), mode, question="q"))
    _check(info.value, "context", "Stage(Reader)")
    assert module.calls == 0
    assert asyncio.run(call(Stage(module), mode, question="q", context="c")).answer == "q/c"


def test_a_renamed_input_is_named_as_the_caller_passes_it(mode: str) -> None:
    s = Stage(Reader(), inputs={"context": "passages"})
    with pytest.raises(ContractError) as info:
        asyncio.run(call(s, mode, question="q"))
    _check(info.value, "passages", "Stage(Reader)")
    assert asyncio.run(call(s, mode, question="q", passages="p")).answer == "q/p"
    # (its own name feeds it too when the state name is not given, as documented)
    assert asyncio.run(call(s, mode, question="q", context="c")).answer == "q/c"


def test_a_predictor_does_not_call_the_lm_without_its_input(mode: str) -> None:
    lm = FakeLM({"answer": "a"})
    with dspy.context(lm=lm), pytest.raises(ContractError) as info:
        asyncio.run(call(Stage(dspy.Predict("question, context -> answer")), mode, question="q"))
    _check(info.value, "context", "Predict(question, context -> answer)")
    assert lm.calls == 0


def test_a_function_stage(mode: str) -> None:
    def join(question: str, context: str) -> dict[str, Any]:
        return {"answer": question + context}

    with pytest.raises(ContractError) as info:
        asyncio.run(call(stage(join, writes=["answer"]), mode, question="q"))
    _check(info.value, "context", "stage 'join'")


def test_with_a_policy_the_same_error(mode: str) -> None:
    s = Stage(Reader(), retry=stageflow.RetryPolicy(max_attempts=3))
    with pytest.raises(ContractError) as info:
        asyncio.run(call(s, mode, question="q"))
    _check(info.value, "context", "Stage(Reader)")


def test_optional_inputs_may_be_left_out(mode: str) -> None:
    def greet(name: str, greeting: str = "hi") -> dict[str, Any]:
        return {"text": f"{greeting} {name}"}

    assert asyncio.run(call(stage(greet, writes=["text"]), mode, name="x")) == {"text": "hi x"}


def test_a_signature_replaced_in_place_is_checked_as_it_is_now(mode: str) -> None:
    # (optimizers replace a predictor's signature in place; the check follows it)
    lm = FakeLM({"answer": "a"})
    fewer = dspy.Predict("question, context -> answer")
    s = Stage(fewer)
    fewer.signature = dspy.Signature("question -> answer")
    with dspy.context(lm=lm):
        assert asyncio.run(call(s, mode, question="q")).answer == "a"
    more = dspy.Predict("question -> answer")
    s2 = Stage(more)
    more.signature = more.signature.prepend("context", dspy.InputField(), type_=str)
    with dspy.context(lm=lm), pytest.raises(ContractError) as info:
        asyncio.run(call(s2, mode, question="q"))
    _check(info.value, "context", "Stage(Predict(")
    assert lm.calls == 1


def test_reads_that_leave_out_a_required_input_are_refused_when_built() -> None:
    with pytest.raises(
        stageflow.ConfigurationError, match=r"reads=\['question'\] leaves out \['context'\]"
    ) as info:
        Stage(dspy.Predict("question, context -> answer"), reads=["question"])
    assert (info.value.code, info.value.field) == ("bad_declaration", "context")

    def f(question: str, context: str) -> dict[str, str]:
        return {"answer": question + context}

    with pytest.raises(stageflow.ConfigurationError, match="leaves out"):
        stage(f, reads=["question"], writes=["answer"])
    # (a function taking **kwargs reads what it is told)
    assert stage(lambda **kw: {"n": len(kw)}, reads=["a"], writes=["n"])(a=1) == {"n": 1}


def test_nested_renames_name_the_field_the_caller_passes(mode: str) -> None:
    # (helper 87, C1: the inner Stage's name 'passages' was reported, where a pipeline says 'docs')
    inner = Stage(dspy.Predict("question, context -> answer"), inputs={"context": "passages"})
    outer = Stage(inner, inputs={"passages": "docs"})
    lm = FakeLM({"answer": "a"})
    with dspy.context(lm=lm), pytest.raises(ContractError) as info:
        asyncio.run(call(outer, mode, question="q"))
    _check(info.value, "docs", "Predict(question, context -> answer)")
    with dspy.context(lm=lm):
        assert asyncio.run(call(outer, mode, question="q", docs="d")).answer == "a"
    assert lm.calls == 1


def test_a_pipeline_plans_a_stage_with_its_predictors_signature_as_it_is_now(mode: str) -> None:
    # (helper 87, C2: a Stage's ports were frozen when built; a pipeline built after an optimizer
    # removed a field still asked for it)
    lm = FakeLM({"answer": "a"})
    pred = dspy.Predict("question, context -> answer")
    s = Stage(pred, writes=["answer"])
    pred.signature = dspy.Signature("question -> answer")
    with dspy.context(lm=lm):
        assert asyncio.run(call(SequentialPipeline([s]), mode, question="q")).answer == "a"
    pred.signature = dspy.Signature("question, context -> answer")
    with dspy.context(lm=lm), pytest.raises(ContractError, match="needs input 'context'"):
        asyncio.run(call(SequentialPipeline([s]), mode, question="q"))
    assert lm.calls == 1
