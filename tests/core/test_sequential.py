"""SequentialPipeline: order, state flow, declared inputs, add_stage, result fields vs run details."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ConfigurationError, Result, RunInfo, SequentialPipeline, StageRecord, stage
from stageflow.testing import FakeLM, call


async def call_positional(p: Any, mode: str, *args: Any) -> Any:
    if mode == "sync":
        return p(*args)
    return await p.acall(*args)


def two_predictors() -> SequentialPipeline:
    return SequentialPipeline([dspy.Predict("question -> draft"), dspy.Predict("question, draft -> answer")])


async def test_stages_run_in_order_and_state_flows(mode: str) -> None:
    order: list[str] = []

    def first(text: str) -> dict[str, Any]:
        order.append("first")
        return {"words": text.split()}

    def second(words: list[str]) -> dict[str, Any]:
        order.append("second")
        return {"count": len(words)}

    def third(count: int, text: str) -> dict[str, Any]:
        order.append("third")
        return {"summary": f"{text!r} has {count} words"}

    p = SequentialPipeline(
        [
            stage(first, writes=["words"]),
            stage(second, writes=["count"]),
            stage(third, writes=["summary"]),
        ]
    )
    result = await call(p, mode, text="one two three")

    assert order == ["first", "second", "third"]
    assert result.words == ["one", "two", "three"]
    assert result.count == 3
    assert result.summary == "'one two three' has 3 words"
    assert isinstance(result, Result)
    assert isinstance(result, dspy.Prediction)


async def test_later_stage_sees_earlier_output_value(mode: str) -> None:
    lm = FakeLM(
        {
            "draft": lambda i: "draft of " + i["question"],
            "answer": lambda i: "final from " + i["draft"],
        }
    )
    with dspy.context(lm=lm):
        result = await call(two_predictors(), mode, question="Q")
    assert result.draft == "draft of Q"
    assert result.answer == "final from draft of Q"
    assert lm.calls == 2


async def test_predict_stages_receive_only_their_declared_inputs(mode: str) -> None:
    lm = FakeLM({"draft": "D", "answer": "A"})
    with dspy.context(lm=lm):
        await call(two_predictors(), mode, question="Q", unrelated="secret", other=3)
    first_inputs = lm.log[0][1]
    second_inputs = lm.log[1][1]
    assert set(first_inputs) == {"question"}
    assert set(second_inputs) == {"question", "draft"}
    assert lm.log[0][0] == ("draft",)
    assert lm.log[1][0] == ("answer",)


async def test_function_stage_with_kwargs_and_reads_gets_only_declared_fields(mode: str) -> None:
    seen: list[dict[str, Any]] = []

    def record(**kwargs: Any) -> dict[str, Any]:
        seen.append(dict(kwargs))
        return {"out": len(kwargs)}

    p = SequentialPipeline(
        [
            stage(lambda a: {"b": a * 2}, writes=["b"]),
            stage(record, reads=["b"], writes=["out"]),
        ]
    )
    result = await call(p, mode, a=5, noise="x")
    assert seen == [{"b": 10}]
    assert result.out == 1


async def test_function_stage_with_only_kwargs_receives_whole_state(mode: str) -> None:
    seen: list[dict[str, Any]] = []

    def record(**kwargs: Any) -> dict[str, Any]:
        seen.append(dict(kwargs))
        return {"out": 1}

    p = SequentialPipeline([stage(lambda a: {"b": a}, writes=["b"]), stage(record, writes=["out"])])
    await call(p, mode, a=1, noise="x")
    assert seen == [{"a": 1, "noise": "x", "b": 1}]


def test_named_predictor_paths_are_list_positions() -> None:
    p = SequentialPipeline(
        [
            dspy.Predict("question -> draft"),
            stage(lambda draft: {"n": len(draft)}, writes=["n"]),
            dspy.ChainOfThought("question, draft -> answer"),
        ]
    )
    assert [name for name, _ in p.named_predictors()] == ["stages[0]", "stages[2].predict"]


def test_add_stage_appends_at_end() -> None:
    p = two_predictors()
    returned = p.add_stage(dspy.Predict("answer -> summary"))
    assert returned is p
    assert [n for n, _ in p.named_predictors()] == ["stages[0]", "stages[1]", "stages[2]"]
    assert p.named_predictors()[2][1] is p.stages[2]
    lm = FakeLM({"summary": "S"})
    with dspy.context(lm=lm):
        result = p(question="Q")
    assert result.summary == "S"
    assert [r.path for r in result.trace] == ["stages[0]", "stages[1]", "stages[2]"]


async def test_add_stage_at_position_0_renumbers_paths_like_named_predictors(mode: str) -> None:
    p = two_predictors()
    old_first, old_second = p.stages
    first = dspy.Predict("topic -> question")
    p.add_stage(first, position=0)

    names = [n for n, _ in p.named_predictors()]
    assert names == ["stages[0]", "stages[1]", "stages[2]"]
    by_name = dict(p.named_predictors())
    assert by_name["stages[0]"] is first
    assert by_name["stages[1]"] is old_first
    assert by_name["stages[2]"] is old_second

    lm = FakeLM({"question": "generated question"})
    with dspy.context(lm=lm, trace=[]):
        result = await call(p, mode, topic="cats")
        executed = [pred for pred, _, _ in dspy.settings.trace]
    # The stage paths in the run trace are exactly the names DSPy gives the predictors that ran.
    assert [r.path for r in result.trace] == names
    id_to_name = {id(pred): name for name, pred in p.named_predictors()}
    assert [id_to_name[id(pred)] for pred in executed] == names
    assert result.question == "generated question"
    assert lm.log[1][1] == {"question": "generated question"}


def test_add_stage_at_position_0_with_function_stage_keeps_predictor_paths_consistent() -> None:
    p = two_predictors()
    p.add_stage(stage(lambda raw: {"question": raw.strip()}, writes=["question"]), position=0)
    assert [n for n, _ in p.named_predictors()] == ["stages[1]", "stages[2]"]
    lm = FakeLM()
    with dspy.context(lm=lm):
        result = p(raw="  Q  ")
    assert result.question == "Q"
    assert [r.path for r in result.trace] == ["stages[0]", "stages[1]", "stages[2]"]


def test_add_stage_negative_position_inserts_before_last() -> None:
    p = SequentialPipeline(
        [stage(lambda a: {"b": a + 1}, writes=["b"]), stage(lambda c: {"d": c}, writes=["d"])]
    )
    p.add_stage(stage(lambda b: {"c": b * 10}, writes=["c"]), position=-1)
    assert p(a=1).d == 20


def test_add_stage_invalidates_cached_contract_check() -> None:
    p = SequentialPipeline([dspy.Predict("question -> answer")])
    assert p.check(["question"]) == ("answer", "question")
    p.add_stage(dspy.Predict("context, answer -> summary"))
    with pytest.raises(stageflow.ContractError) as ei:
        p.check(["question"])
    assert ei.value.field == "context"
    assert ei.value.stage_path == "stages[1]"


def test_add_stage_out_of_range_is_configuration_error() -> None:
    p = two_predictors()
    with pytest.raises(ConfigurationError) as ei:
        p.add_stage(dspy.Predict("a -> b"), position=5)
    assert ei.value.code == "bad_position"
    assert len(p.stages) == 2


async def test_result_fields_are_state_and_run_details_are_attributes(mode: str) -> None:
    lm = FakeLM({"draft": "D", "answer": "A"})
    with dspy.context(lm=lm):
        result = await call(two_predictors(), mode, question="Q")

    assert list(result.keys()) == ["question", "draft", "answer"]
    assert "stage_outputs" not in list(result.keys())
    assert "trace" not in list(result.keys())
    assert "run" not in list(result.keys())
    assert result.toDict() == {"question": "Q", "draft": "D", "answer": "A"}

    assert isinstance(result.run, RunInfo)
    assert all(isinstance(r, StageRecord) for r in result.trace)
    assert [r.path for r in result.trace] == ["stages[0]", "stages[1]"]
    assert all(r.ok for r in result.trace)
    assert all(r.elapsed >= 0.0 for r in result.trace)

    assert list(result.stage_outputs) == ["stages[0]", "stages[1]"]
    assert result.stage_outputs["stages[0]"].draft == "D"
    assert result.stage_outputs["stages[1]"].answer == "A"
    assert result.stage_outputs is result.run.stage_outputs
    assert result.trace is result.run.trace


def test_unknown_result_attribute_is_attribute_error_listing_fields() -> None:
    result = SequentialPipeline([stage(lambda a: {"b": a}, writes=["b"])])(a=1)
    with pytest.raises(AttributeError, match="Fields: \\['a', 'b'\\]"):
        _ = result.nope


async def test_positional_call_is_configuration_error(mode: str) -> None:
    lm = FakeLM()
    p = two_predictors()
    with dspy.context(lm=lm), pytest.raises(ConfigurationError) as ei:
        await call_positional(p, mode, "Q")
    assert ei.value.code == "positional_args"
    assert "pipeline(question=...)" in str(ei.value)
    assert lm.calls == 0


@pytest.mark.parametrize(
    "stages",
    [
        "question -> answer",
        [dspy.Predict],
        ["question -> answer"],
        [42],
        7,
    ],
)
def test_bad_stage_definitions_are_configuration_errors(stages: Any) -> None:
    with pytest.raises(ConfigurationError) as ei:
        SequentialPipeline(stages)
    assert ei.value.code in {"bad_stages", "not_a_stage"}


def test_state_does_not_leak_between_calls() -> None:
    p = SequentialPipeline([stage(lambda a, b=0: {"c": a + b}, writes=["c"])])
    assert p(a=1, b=5).c == 6
    second = p(a=1)
    assert second.c == 1
    assert "b" not in list(second.keys())


def test_add_stage_on_nested_pipeline_is_seen_by_enclosing_pipeline() -> None:
    inner = SequentialPipeline([stage(lambda a: {"b": a}, writes=["b"])])
    outer = SequentialPipeline([inner, stage(lambda b: {"c": b}, writes=["c"])])
    assert outer(a=1, extra=5).c == 1
    inner.add_stage(stage(lambda b, extra: {"d": b + extra}, writes=["d"]))
    assert inner(a=1, extra=5).d == 6
    assert outer(a=1, extra=5).d == 6
