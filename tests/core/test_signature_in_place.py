"""A predictor whose signature is replaced in place after its pipeline was built (``pred.signature =
pred.signature.prepend(...)``, as DSPy code does) runs with the fields it has now: the stage is fed
its new inputs, a missing one is a ContractError naming the stage and the field, a Stage wrapper
whose contract was computed from the old fields says so, and a signature with the same fields (new
instructions, what optimizers set) keeps the plan. Every scenario runs sync and async."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ConfigurationError, ContractError, SequentialPipeline, Stage, stage
from stageflow.patterns.base import Pipeline
from stageflow.testing import FakeLM, call, isolated_dspy


@pytest.fixture
def lm() -> Any:
    fake = FakeLM({"answer": lambda inputs: "|".join(sorted(inputs))})
    with isolated_dspy(fake):
        yield fake


def _with_context(pred: Any) -> SequentialPipeline:
    return SequentialPipeline([stage(lambda question: {"context": "ctx"}, writes=["context"]), pred])


async def test_a_prepended_input_is_fed_on_the_next_call(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    program = _with_context(pred)
    assert (await call(program, mode, question="q")).answer == "question"
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    assert (await call(program, mode, question="q")).answer == "context|question"
    assert lm.log[-1][1] == {"context": "ctx", "question": "q"}
    assert (await call(program, mode, question="q")).answer == "context|question"


async def test_new_instructions_keep_the_plan(mode: str, lm: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pred = dspy.Predict("question -> answer")
    program = SequentialPipeline([pred])
    await call(program, mode, question="q")
    replanned: list[str] = []
    real = Pipeline.stageflow_replanned

    def spy(self: Any, entry: Any, prefix: str) -> Any:
        replanned.append(entry.path)
        return real(self, entry, prefix)

    monkeypatch.setattr(Pipeline, "stageflow_replanned", spy)
    pred.signature = pred.signature.with_instructions("Answer in one word.")
    assert (await call(program, mode, question="q")).answer == "question"
    assert replanned == []
    pred.signature = pred.signature.append("hint", dspy.InputField(), type_=str)
    assert (await call(program, mode, question="q", hint="h")).answer == "hint|question"
    assert replanned == ["stages[0]"]
    assert (await call(program, mode, question="q", hint="h")).answer == "hint|question"
    assert replanned == ["stages[0]"]  # (the new plan holds the new signature)


async def test_a_new_input_nobody_gives_is_a_contract_error(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    ran: list[str] = []
    program = SequentialPipeline([stage(lambda question: ran.append(question) or {}, writes=[]), pred])
    await call(program, mode, question="q")
    pred.signature = pred.signature.append("extra", dspy.InputField(), type_=str)
    calls = lm.calls
    for _ in range(2):
        with pytest.raises(ContractError) as info:
            await call(program, mode, question="q")
        assert info.value.stage_path == "stages[1]"
        assert info.value.field == "extra"
    assert lm.calls == calls  # the LM was never called without it
    assert ran == ["q"]  # both calls were refused by the contract check, before any stage ran


async def test_a_stage_wrapper_planned_with_the_old_fields_says_so(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    program = SequentialPipeline([Stage(pred, inputs={"question": "query"})])
    assert (await call(program, mode, query="q")).answer == "question"
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    with pytest.raises(ConfigurationError) as info:
        await call(program, mode, query="q", context="c")
    assert info.value.stage_path == "stages[0]"
    assert info.value.code == "structure_changed"
    assert "['question'] -> ['context', 'question']" in str(info.value)


async def test_a_predictor_in_a_nested_pipeline_and_a_chain_of_thought(mode: str, lm: Any) -> None:
    cot = dspy.ChainOfThought("question -> answer")
    pred = dspy.Predict("question -> answer")
    inner = SequentialPipeline([cot, stage(lambda answer: {"question": answer}, writes=["question"]), pred])
    program = SequentialPipeline([stage(lambda question: {"context": "ctx"}, writes=["context"]), inner])
    for _ in range(2):  # (the nested pipeline runs in line from the second call)
        assert (await call(program, mode, question="q")).answer == "question"
    cot.predict.signature = cot.predict.signature.prepend("context", dspy.InputField(), type_=str)
    pred.signature = pred.signature.prepend("context", dspy.InputField(), type_=str)
    result = await call(program, mode, question="q")
    assert result.answer == "context|question"
    assert [inputs for _, inputs in lm.log[-2:]] == [
        {"context": "ctx", "question": "q"},
        {"context": "ctx", "question": "context|question"},
    ]


async def test_a_foreach_predictor_keeps_its_item_paths(mode: str, lm: Any) -> None:
    pred = dspy.Predict("question -> answer")
    each = stageflow.ForEach(pred, over="questions", item="question", collect={"answer": "answers"})
    program = SequentialPipeline([each])
    assert (await call(program, mode, questions=["a", "b"], tone="t")).answers == ["question"] * 2
    pred.signature = pred.signature.append("tone", dspy.InputField(), type_=str)
    result = await call(program, mode, questions=["a", "b"], tone="t")
    assert result.answers == ["question|tone"] * 2
    assert sorted(r.path for r in result.trace if r.path.startswith("stages[0].")) == [
        "stages[0].stage[0]",
        "stages[0].stage[1]",
    ]


async def test_a_signature_replaced_by_an_earlier_stage_mid_run(mode: str) -> None:
    # Seen at the stage call itself (the check before the run saw the old one): the stage runs with
    # the new plan's entry, recovery strategy included.
    lm = FakeLM({"answer": "fine"}, fail_with=lambda n: RuntimeError("model down") if n > 1 else None)
    pred = dspy.Predict("question -> answer")

    def prepare(question: str) -> dict[str, Any]:
        if question == "grow":
            pred.signature = pred.signature.append("hint", dspy.InputField(), type_=str)
        return {"hint": "h"}

    program = stageflow.ErrorHandlingPipeline(
        [stage(prepare, writes=["hint"]), pred],
        recovery_strategies={1: lambda error, state: {"answer": "recovered"}},
    )
    with dspy.context(lm=lm):
        assert (await call(program, mode, question="q")).answer == "fine"
        assert (await call(program, mode, question="grow")).answer == "recovered"
    assert lm.log[-1][1] == {"question": "grow", "hint": "h"}
