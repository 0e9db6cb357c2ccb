"""BranchingPipeline: normalisation, routing errors, defaults, lm_router, route decisions."""

from __future__ import annotations

import typing
from typing import Any, Literal

import dspy
import pytest

from stageflow import (
    BranchingPipeline,
    ConfigurationError,
    RouteDecision,
    RoutingError,
    Stage,
    lm_router,
    normalize_branch,
    stage,
)
from stageflow.testing import Counter, FakeLM, call


def answer(text: str) -> Any:
    return stage(lambda question: {"answer": text}, writes=["answer"], name=f"answer_{text}")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Short Answer", "short_answer"),
        ("short-answer", "short_answer"),
        ("  Short-Answer. ", "short_answer"),
        ("SHORT_ANSWER", "short_answer"),
        ("short  --  answer", "short_answer"),
        ("'Math'", "math"),
        ('"math".', "math"),
        ("Math\n", "math"),
    ],
)
def test_normalize_branch(raw: str, expected: str) -> None:
    assert normalize_branch(raw) == expected


def test_branch_names_are_normalised_in_paths() -> None:
    b = BranchingPipeline(
        lambda question: "x",
        {"Short Answer": dspy.Predict("question -> answer"), "long-form": dspy.Predict("question -> answer")},
    )
    assert sorted(b.branches) == ["long_form", "short_answer"]
    assert [n for n, _ in b.named_predictors()] == ["branches['short_answer']", "branches['long_form']"]


@pytest.mark.parametrize("raw", ["Short Answer", "short-answer", "SHORT ANSWER."])
async def test_router_output_is_normalised_to_pick_branch(mode: str, raw: str) -> None:
    b = BranchingPipeline(lambda question: raw, {"short-answer": answer("short"), "Long": answer("long")})
    result = await call(b, mode, question="Q")
    assert result.answer == "short"
    assert result.branch == "short_answer"
    assert result.route_decision == RouteDecision(
        raw=raw, normalized="short_answer", chosen="short_answer", used_default=False
    )
    assert [r.path for r in result.trace] == ["router", "branches['short_answer']"]


async def test_only_the_chosen_branch_runs(mode: str) -> None:
    math, chat = Counter("m"), Counter("c")
    b = BranchingPipeline(
        lambda question: "math", {"math": math.as_stage(["question"]), "chat": chat.as_stage(["question"])}
    )
    result = await call(b, mode, question="Q")
    assert (math.n, chat.n) == (1, 0)
    assert result.m == 1
    assert "c" not in list(result.keys())


async def test_unknown_branch_is_routing_error_listing_known_branches(mode: str) -> None:
    lm = FakeLM()
    b = BranchingPipeline(
        lambda question: "poetry",
        {"math": dspy.Predict("question -> answer"), "chat": dspy.Predict("question -> answer")},
    )
    with dspy.context(lm=lm), pytest.raises(RoutingError) as ei:
        await call(b, mode, question="Q")
    err = ei.value
    assert err.code == "unknown_branch"
    assert err.stage_path == "router"
    assert err.field == "branch"
    assert "Known branches: ['chat', 'math']" in str(err)
    assert "'poetry'" in str(err)
    assert lm.calls == 0


async def test_default_as_branch_name(mode: str) -> None:
    b = BranchingPipeline(
        lambda question: "poetry", {"math": answer("m"), "Chat": answer("c")}, default="Chat"
    )
    result = await call(b, mode, question="Q")
    assert result.answer == "c"
    assert result.branch == "chat"
    assert result.route_decision == RouteDecision("poetry", "poetry", "chat", True)
    assert [r.path for r in result.trace] == ["router", "branches['chat']"]


async def test_default_as_separate_stage(mode: str) -> None:
    lm = FakeLM({"answer": "from default"})
    fallback = dspy.Predict("question -> answer")
    b = BranchingPipeline(lambda question: "poetry", {"math": answer("m")}, default=fallback)
    assert [n for n, _ in b.named_predictors()] == ["default"]
    with dspy.context(lm=lm):
        result = await call(b, mode, question="Q")
    assert result.answer == "from default"
    assert result.branch == "default"
    assert result.route_decision.used_default is True
    assert result.route_decision.chosen == "default"
    assert [r.path for r in result.trace] == ["router", "default"]


async def test_known_branch_is_used_even_with_default(mode: str) -> None:
    b = BranchingPipeline(lambda question: "MATH", {"math": answer("m")}, default=answer("d"))
    result = await call(b, mode, question="Q")
    assert result.answer == "m"
    assert result.route_decision.used_default is False


@pytest.mark.parametrize("raw", [None, "", "   "])
async def test_router_returning_nothing_is_empty_route(mode: str, raw: Any) -> None:
    b = BranchingPipeline(lambda question: raw, {"math": answer("m")})
    with pytest.raises(RoutingError) as ei:
        await call(b, mode, question="Q")
    assert ei.value.code == "empty_route"
    assert ei.value.stage_path == "router"
    assert "Known branches: ['math']" in str(ei.value)


@pytest.mark.parametrize("raw", [None, ""])
async def test_router_returning_nothing_uses_default(mode: str, raw: Any) -> None:
    b = BranchingPipeline(lambda question: raw, {"math": answer("m"), "chat": answer("c")}, default="chat")
    result = await call(b, mode, question="Q")
    assert result.answer == "c"
    assert result.route_decision.used_default is True


def test_lm_router_has_literal_branch_output() -> None:
    router = lm_router(["Math", "Small Talk"], inputs=["question", "context"])
    sig = router.signature
    assert list(sig.input_fields) == ["question", "context"]
    assert list(sig.output_fields) == ["branch"]
    annotation = sig.output_fields["branch"].annotation
    assert typing.get_origin(annotation) is Literal
    assert typing.get_args(annotation) == ("math", "small_talk")
    assert "math, small_talk" in sig.instructions
    assert lm_router(["a"], instructions="Pick.").signature.instructions == "Pick."


def test_lm_router_needs_branches() -> None:
    with pytest.raises(ConfigurationError) as ei:
        lm_router([])
    assert ei.value.code == "no_branches"


async def test_lm_router_in_pipeline(mode: str) -> None:
    lm = FakeLM(
        {
            "branch": lambda i: "small_talk" if "hello" in i["question"] else "math",
            "answer": lambda i: "ans:" + i["question"],
        }
    )
    b = BranchingPipeline(
        lm_router(["Math", "Small Talk"]),
        {"Math": dspy.Predict("question -> answer"), "Small Talk": answer("hi there")},
    )
    assert [n for n, _ in b.named_predictors()] == ["router", "branches['math']"]
    with dspy.context(lm=lm):
        chat = await call(b, mode, question="hello you")
        math = await call(b, mode, question="2+2")
    assert (chat.branch, chat.answer) == ("small_talk", "hi there")
    assert (math.branch, math.answer) == ("math", "ans:2+2")
    assert lm.calls == 3


async def test_function_router_returning_plain_string(mode: str) -> None:
    def route(question: str) -> str:
        return "math" if any(c.isdigit() for c in question) else "chat"

    b = BranchingPipeline(route, {"math": answer("m"), "chat": answer("c")})
    assert b.router.ports.outputs == ("branch",)
    assert (await call(b, mode, question="1+1")).answer == "m"
    assert (await call(b, mode, question="hi")).answer == "c"


async def test_function_router_returning_dict(mode: str) -> None:
    b = BranchingPipeline(lambda question: {"branch": "Chat"}, {"math": answer("m"), "chat": answer("c")})
    result = await call(b, mode, question="x")
    assert result.answer == "c"
    assert result.branch == "chat"


async def test_router_with_renamed_output(mode: str) -> None:
    lm = FakeLM({"category": "chat"})
    router = Stage(dspy.Predict("question -> category"), outputs={"category": "branch"})
    b = BranchingPipeline(router, {"math": answer("m"), "chat": answer("c")})
    with dspy.context(lm=lm):
        result = await call(b, mode, question="x")
    assert result.answer == "c"


def test_router_without_branch_output_is_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as ei:
        BranchingPipeline(dspy.Predict("question -> category"), {"math": answer("m")})
    assert ei.value.code == "no_route_field"
    assert "outputs={'category': 'branch'}" in str(ei.value)


@pytest.mark.parametrize(
    ("branches", "default", "code"),
    [
        ({}, None, "no_branches"),
        ({"a": answer("a"), "A": answer("b")}, None, "duplicate_branch"),
        ({"a": answer("a")}, "b", "unknown_branch"),
        ({"...": answer("a")}, None, "bad_branch"),
        ({"a": "not a stage"}, None, "not_a_stage"),
    ],
)
def test_bad_branch_definitions(branches: dict[str, Any], default: Any, code: str) -> None:
    with pytest.raises(ConfigurationError) as ei:
        BranchingPipeline(lambda question: "a", branches, default=default)
    assert ei.value.code == code


async def test_route_decision_is_not_a_field(mode: str) -> None:
    b = BranchingPipeline(lambda question: "a", {"a": answer("x")})
    result = await call(b, mode, question="Q")
    assert list(result.keys()) == ["question", "branch", "answer"]
    assert isinstance(result.route_decision, RouteDecision)


def test_routing_does_not_leak_between_calls() -> None:
    b = BranchingPipeline(lambda question: question, {"a": answer("A"), "b": answer("B")}, default="a")
    assert b(question="b").route_decision.used_default is False
    second = b(question="zzz")
    assert second.route_decision == RouteDecision("zzz", "zzz", "a", True)
    third = b(question="b")
    assert (third.answer, third.route_decision.used_default) == ("B", False)
