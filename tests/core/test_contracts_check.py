"""Contract check: missing inputs before any LM call, caching, reserved names, types, branches, outputs."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

from stageflow import (
    BranchingPipeline,
    ContractError,
    IterativePipeline,
    SequentialPipeline,
    Stage,
    StageflowError,
    stage,
)
from stageflow.engine.plan import Scope
from stageflow.testing import FakeLM, call


def needs_context() -> SequentialPipeline:
    return SequentialPipeline([dspy.Predict("question -> draft"), dspy.Predict("context, draft -> answer")])


async def test_missing_input_raises_before_any_lm_call(mode: str) -> None:
    lm = FakeLM()
    with dspy.context(lm=lm), pytest.raises(ContractError) as ei:
        await call(needs_context(), mode, question="Q")
    err = ei.value
    assert lm.calls == 0
    assert err.stage_path == "stages[1]"
    assert err.field == "context"
    assert err.code == "missing_input"
    text = str(err)
    assert "Available: ['draft', 'question']" in text
    assert "'draft' from 'stages[0]'" in text
    assert "Fix: pass context=... when calling the pipeline" in text
    assert "inputs={'context': 'draft'}" in text


def test_check_returns_fields_on_every_path() -> None:
    p = needs_context()
    assert p.check(inputs=["question", "context"]) == ("answer", "context", "draft", "question")
    assert p.check(["question", "context", "extra"]) == ("answer", "context", "draft", "extra", "question")


def test_check_raises_without_running_anything() -> None:
    calls: list[str] = []
    p = SequentialPipeline(
        [
            stage(lambda a: calls.append("ran") or {"b": 1}, writes=["b"]),
            stage(lambda c: {"d": 1}, writes=["d"]),
        ]
    )
    with pytest.raises(ContractError) as ei:
        p.check(["a"])
    assert ei.value.field == "c"
    assert calls == []


def test_check_is_cached_per_input_names(monkeypatch: pytest.MonkeyPatch) -> None:
    counter = {"n": 0}
    original = Scope.check

    def counting(self: Scope, entry: Any, prefix: str) -> None:
        counter["n"] += 1
        original(self, entry, prefix)

    monkeypatch.setattr(Scope, "check", counting)
    p = needs_context()
    first = p.check(["question", "context"])
    analyzed = counter["n"]
    assert analyzed == 2
    assert p.check(["context", "question"]) == first
    assert counter["n"] == analyzed

    lm = FakeLM()
    with dspy.context(lm=lm):
        p(question="Q", context="C")
        p(question="Q2", context="C2")
    assert counter["n"] == analyzed
    assert lm.calls == 4

    p.check(["question", "context", "more"])
    assert counter["n"] == analyzed * 2


def test_failed_check_is_not_cached() -> None:
    p = needs_context()
    for _ in range(2):
        with pytest.raises(ContractError):
            p.check(["question"])


async def test_output_colliding_with_prediction_method_is_reserved_field(mode: str) -> None:
    lm = FakeLM()
    p = SequentialPipeline([dspy.Predict("question -> items")])
    with dspy.context(lm=lm), pytest.raises(ContractError) as ei:
        await call(p, mode, question="Q")
    assert ei.value.code == "reserved_field"
    assert ei.value.field == "items"
    assert ei.value.stage_path == "stages[0]"
    assert "outputs={'items': 'items_value'}" in str(ei.value)
    assert lm.calls == 0


@pytest.mark.parametrize("name", ["keys", "values", "get", "toDict", "trace", "stage_outputs", "run"])
def test_reserved_output_names(name: str) -> None:
    p = SequentialPipeline([stage(lambda text: 1, writes=[name])])
    with pytest.raises(ContractError) as ei:
        p.check(["text"])
    assert ei.value.code == "reserved_field"
    assert ei.value.field == name


def test_renaming_away_from_reserved_field_passes() -> None:
    p = SequentialPipeline(
        [Stage(stage(lambda text: [text], writes=["items"]), outputs={"items": "item_list"})]
    )
    assert p(text="x").item_list == ["x"]


def test_reserved_input_name_is_contract_error() -> None:
    p = SequentialPipeline([stage(lambda text: 1, writes=["n"])])
    with pytest.raises(ContractError) as ei:
        p(text="x", items=[1])
    assert ei.value.code == "reserved_field"
    assert ei.value.field == "items"


def test_list_output_fed_to_str_parameter_is_list_vs_scalar() -> None:
    def search(queries: str) -> dict[str, Any]:
        return {"hits": [queries]}

    lm = FakeLM()
    p = SequentialPipeline([dspy.Predict("question -> queries: list[str]"), stage(search, writes=["hits"])])
    with dspy.context(lm=lm), pytest.raises(ContractError) as ei:
        p(question="Q")
    err = ei.value
    assert err.code == "list_vs_scalar"
    assert err.field == "queries"
    assert err.stage_path == "stages[1]"
    assert "list[str]" in str(err)
    assert lm.calls == 0


def test_list_output_fed_to_list_parameter_is_fine() -> None:
    def search(queries: list[str]) -> dict[str, Any]:
        return {"hits": len(queries)}

    lm = FakeLM({"queries": ["a", "b"]})
    p = SequentialPipeline([dspy.Predict("question -> queries: list[str]"), stage(search, writes=["hits"])])
    with dspy.context(lm=lm):
        assert p(question="Q").hits == 2


def test_list_vs_scalar_through_a_rename_and_a_nested_pipeline() -> None:
    def search(q: str) -> dict[str, Any]:
        return {"hits": [q]}

    p = SequentialPipeline(
        [
            SequentialPipeline([dspy.Predict("question -> queries: list[str]")]),
            Stage(stage(search, writes=["hits"]), inputs={"q": "queries"}),
        ]
    )
    with pytest.raises(ContractError) as ei:
        p.check(["question"])
    assert ei.value.code == "list_vs_scalar"
    assert ei.value.field == "queries"


def one_branch_extra() -> SequentialPipeline:
    branching = BranchingPipeline(
        lambda question: "math",
        {
            "math": stage(lambda question: {"answer": "4", "extra": "work"}, writes=["answer", "extra"]),
            "chat": dspy.Predict("question -> answer"),
        },
    )
    return SequentialPipeline([branching, stage(lambda extra: {"shown": extra}, writes=["shown"])])


def test_field_from_only_one_branch_is_not_available_downstream() -> None:
    lm = FakeLM()
    with dspy.context(lm=lm), pytest.raises(ContractError) as ei:
        one_branch_extra()(question="Q")
    err = ei.value
    assert err.code == "missing_input"
    assert err.field == "extra"
    assert err.stage_path == "stages[1]"
    assert lm.calls == 0


def test_field_from_only_one_branch_error_names_the_branch() -> None:
    with pytest.raises(ContractError) as ei:
        one_branch_extra().check(["question"])
    assert "branches['math']" in str(ei.value)


def test_common_branch_outputs_are_available_downstream() -> None:
    branching = BranchingPipeline(
        lambda question: "a",
        {
            "a": stage(lambda question: {"answer": "A"}, writes=["answer"]),
            "b": stage(lambda question: {"answer": "B", "x": 1}, writes=["answer", "x"]),
        },
    )
    p = SequentialPipeline([branching, stage(lambda answer: answer.lower(), writes=["low"])])
    assert p.check(["question"]) == ("answer", "branch", "low", "question")
    assert p(question="?").low == "a"


def test_missing_input_inside_a_branch_names_the_branch_path() -> None:
    lm = FakeLM()
    b = BranchingPipeline(
        lambda question: "math",
        {"math": dspy.Predict("question, context -> answer"), "chat": dspy.Predict("question -> answer")},
    )
    with dspy.context(lm=lm), pytest.raises(ContractError) as ei:
        b(question="Q")
    assert ei.value.stage_path == "branches['math']"
    assert ei.value.field == "context"
    assert lm.calls == 0


def test_missing_input_of_nested_pipeline_names_the_inner_stage() -> None:
    p = SequentialPipeline([stage(lambda question: {"d": 1}, writes=["d"]), needs_context()])
    with pytest.raises(ContractError) as ei:
        p.check(["question"])
    assert ei.value.stage_path == "stages[1]"
    assert ei.value.field == "context"
    assert "(for its stage 'stages[1].stages[1]')" in str(ei.value)


async def test_missing_declared_output_at_run_time(mode: str) -> None:
    p = SequentialPipeline([stage(lambda text: {"a": 1}, writes=["b"])])
    with pytest.raises(ContractError) as ei:
        await call(p, mode, text="x")
    err = ei.value
    assert err.code == "missing_output"
    assert err.field == "b"
    assert err.stage_path == "stages[0]"
    assert "It returned: ['a']" in str(err)


def test_module_with_undeclared_outputs_is_refused_only_under_strict_contracts() -> None:
    class Opaque(dspy.Module):
        def forward(self, question: str) -> dspy.Prediction:
            return dspy.Prediction(foo=question)

    open_p = SequentialPipeline([Opaque(), stage(lambda foo: {"z": foo}, writes=["z"])])
    assert open_p(question="q").z == "q"
    strict_p = SequentialPipeline([Opaque(), stage(lambda foo: {"z": foo}, writes=["z"])], strict=True)
    with pytest.raises(ContractError) as ei:
        strict_p(question="q")
    assert "stages ['stages[0]'] have undeclared outputs" in str(ei.value)
    assert "writes=['foo']" in str(ei.value)
    declared = SequentialPipeline(
        [Stage(Opaque(), writes=["foo"]), stage(lambda foo: {"z": foo}, writes=["z"])], strict=True
    )
    assert declared(question="q").z == "q"


def test_iterative_first_iteration_requirements_are_checked() -> None:
    loop = IterativePipeline(
        [
            stage(lambda draft, feedback: {"draft": draft + feedback}, writes=["draft"]),
            stage(lambda draft: {"feedback": "!"}, writes=["feedback"]),
        ],
        lambda s: True,
    )
    with pytest.raises(ContractError) as ei:
        loop.check(["draft"])
    assert ei.value.field == "feedback"
    assert loop.check(["draft", "feedback"]) == ("draft", "feedback")


def test_contract_errors_are_stageflow_errors() -> None:
    with pytest.raises(StageflowError):
        needs_context().check(["question"])
