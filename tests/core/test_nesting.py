"""Nesting: every architecture inside every other, predictor paths, error paths."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import dspy
import pytest

from stageflow import (
    BranchingPipeline,
    ContractError,
    HierarchicalPipeline,
    IterativePipeline,
    LoopLimitError,
    RoutingError,
    SequentialPipeline,
    Stage,
    StageError,
    stage,
)
from stageflow.testing import FakeLM, call


def seq(inner: Any) -> Any:
    return SequentialPipeline([stage(lambda question: {"seen": question}, writes=["seen"]), inner])


def branch(inner: Any) -> Any:
    return BranchingPipeline(
        lambda question: "Only One",
        {"only-one": inner, "other": stage(lambda question: "x", writes=["answer"])},
    )


def loop(inner: Any) -> Any:
    return IterativePipeline([inner], lambda state: True, max_iterations=2)


def hier(inner: Any) -> Any:
    return HierarchicalPipeline(
        {"root": {"type": "pipeline", "stages": ["leaf"]}, "leaf": {"type": "module", "module": inner}}
    )


WRAPPERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "sequential": (seq, "stages[1]"),
    "branching": (branch, "branches['only_one']"),
    "iterative": (loop, "stages[0]"),
    "hierarchical": (hier, "nodes['root'].stages[0]"),
}
PAIRS = list(itertools.product(WRAPPERS, WRAPPERS))


def build(outer: str, inner: str, leaf: Any) -> tuple[Any, str]:
    wrap_out, path_out = WRAPPERS[outer]
    wrap_in, path_in = WRAPPERS[inner]
    return wrap_out(wrap_in(leaf)), f"{path_out}.{path_in}"


@pytest.mark.parametrize(("outer", "inner"), PAIRS)
async def test_every_architecture_inside_every_other(outer: str, inner: str, mode: str) -> None:
    fake = FakeLM({"answer": lambda i: "A:" + i["question"]})
    predictor = dspy.Predict("question -> answer")
    pipeline, path = build(outer, inner, predictor)

    named = pipeline.named_predictors()
    assert [n for n, _ in named] == [path]
    assert named[0][1] is predictor

    with dspy.context(lm=fake):
        result = await call(pipeline, mode, question="Q")
    assert result.answer == "A:Q"
    assert result.question == "Q"
    assert fake.calls == 1
    assert path in [r.path for r in result.trace]
    assert all(r.ok for r in result.trace)


@pytest.mark.parametrize(("outer", "inner"), PAIRS)
async def test_errors_from_nested_stage_carry_full_path_and_cause(outer: str, inner: str, mode: str) -> None:
    original = RuntimeError("deep failure")

    def boom(question: str) -> dict[str, Any]:
        raise original

    pipeline, path = build(outer, inner, stage(boom, writes=["answer"]))
    with pytest.raises(StageError) as ei:
        await call(pipeline, mode, question="Q")
    err = ei.value
    assert err.stage_path == path
    assert err.__cause__ is original
    assert f"Stage '{path}' (function boom()) raised RuntimeError: deep failure" == str(err)


def deep() -> tuple[HierarchicalPipeline, dict[str, Any]]:
    """hierarchical > iterative > branching > sequential > predictors."""
    draft = dspy.Predict("question -> draft")
    final = dspy.ChainOfThought("question, draft -> answer")
    chat = dspy.Predict("question -> answer")
    inner_seq = SequentialPipeline([draft, final])
    router = BranchingPipeline(
        lambda question: "math" if any(c.isdigit() for c in question) else "chat",
        {"math": inner_seq, "chat": chat},
    )
    looped = IterativePipeline(
        [router, stage(lambda answer, n=0: {"n": n + 1}, writes=["n"])],
        lambda s: s["n"] >= 2,
        max_iterations=5,
    )
    h = HierarchicalPipeline(
        {
            "root": {"type": "pipeline", "stages": ["prep", "loop"]},
            "prep": stage(lambda question: {"question": question.strip()}, writes=["question"]),
            "loop": looped,
        }
    )
    return h, {"draft": draft, "final": final.predict, "chat": chat}


DEEP_PATHS = [
    "nodes['root'].stages[1].stages[0].branches['math'].stages[0]",
    "nodes['root'].stages[1].stages[0].branches['math'].stages[1].predict",
    "nodes['root'].stages[1].stages[0].branches['chat']",
]


def test_deep_nesting_lists_every_predictor_once_with_stable_paths() -> None:
    h, preds = deep()
    named = h.named_predictors()
    assert [n for n, _ in named] == DEEP_PATHS
    assert [p for _, p in named] == [preds["draft"], preds["final"], preds["chat"]]
    assert [n for n, _ in deep()[0].named_predictors()] == DEEP_PATHS
    assert [n for n, _ in h.deepcopy().named_predictors()] == DEEP_PATHS


async def test_deep_nesting_runs(mode: str) -> None:
    fake = FakeLM({"draft": "d", "reasoning": "r", "answer": lambda i: "ans:" + i["question"]})
    h, _ = deep()
    with dspy.context(lm=fake):
        math = await call(h, mode, question=" 2+2 ")
        chat = await call(h, mode, question="hi")
    assert (math.question, math.answer, math.n, math.branch) == ("2+2", "ans:2+2", 2, "math")
    assert (chat.answer, chat.branch) == ("ans:hi", "chat")
    # math: (draft + final) x 2 iterations; chat: 1 x 2 iterations
    assert fake.calls == 6
    paths = [r.path for r in math.trace]
    assert paths.count("nodes['root'].stages[1].stages[0].branches['math'].stages[1]") == 2


async def test_nested_error_path_sequential_in_sequential(mode: str) -> None:
    original = ValueError("bad")

    def boom(text: str) -> dict[str, Any]:
        raise original

    p = SequentialPipeline(
        [stage(lambda text: {"y": 1}, writes=["y"]), SequentialPipeline([stage(boom, writes=["x"])])]
    )
    with pytest.raises(StageError) as ei:
        await call(p, mode, text="t")
    assert ei.value.stage_path == "stages[1].stages[0]"
    assert ei.value.__cause__ is original


async def test_nested_contract_and_routing_errors_are_prefixed(mode: str) -> None:
    missing = SequentialPipeline(
        [
            stage(lambda text: {"y": 1}, writes=["y"]),
            SequentialPipeline([stage(lambda text: {"a": 1}, writes=["b"])]),
        ]
    )
    with pytest.raises(ContractError) as ce:
        await call(missing, mode, text="t")
    assert ce.value.stage_path == "stages[1].stages[0]"
    assert ce.value.code == "missing_output"
    assert "Stage 'stages[1].stages[0]'" in str(ce.value)

    routed = SequentialPipeline(
        [
            stage(lambda text: {"y": 1}, writes=["y"]),
            BranchingPipeline(lambda text: "zz", {"a": stage(lambda text: 1, writes=["x"])}),
        ]
    )
    with pytest.raises(RoutingError) as re_:
        await call(routed, mode, text="t")
    assert re_.value.stage_path == "stages[1].router"

    limited = SequentialPipeline(
        [
            IterativePipeline(
                [stage(lambda text: 1, writes=["x"])], lambda s: False, max_iterations=2, on_limit="raise"
            )
        ]
    )
    with pytest.raises(LoopLimitError) as le:
        await call(limited, mode, text="t")
    assert le.value.stage_path == "stages[0]"


async def test_nested_pipeline_result_fields_merge_into_outer_state(mode: str) -> None:
    inner = SequentialPipeline(
        [stage(lambda a: {"b": a + 1}, writes=["b"]), stage(lambda b: {"c": b * 2}, writes=["c"])]
    )
    outer = SequentialPipeline([inner, stage(lambda c: {"d": c + 1}, writes=["d"])])
    result = await call(outer, mode, a=1)
    assert result.toDict() == {"a": 1, "b": 2, "c": 4, "d": 5}
    assert [r.path for r in result.trace] == [
        "stages[0]",
        "stages[0].stages[0]",
        "stages[0].stages[1]",
        "stages[1]",
    ]


async def test_renamed_input_of_nested_pipeline_does_not_overwrite_outer_field(mode: str) -> None:
    inner = SequentialPipeline([stage(lambda question: {"answer": question.upper()}, writes=["answer"])])
    outer = SequentialPipeline(
        [
            stage(lambda question: {"draft": "draft text"}, writes=["draft"]),
            Stage(inner, inputs={"question": "draft"}),
        ]
    )
    result = await call(outer, mode, question="original")
    assert result.answer == "DRAFT TEXT"
    assert result.question == "original"


async def test_renamed_output_of_nested_pipeline_keeps_nested_trace(mode: str) -> None:
    inner = SequentialPipeline([stage(lambda question: {"answer": question.upper()}, writes=["answer"])])
    outer = SequentialPipeline([Stage(inner, outputs={"answer": "final"})])
    result = await call(outer, mode, question="q")
    assert result.final == "Q"
    assert [r.path for r in result.trace] == ["stages[0]", "stages[0].stages[0]"]
