"""Bad input never escapes as a bare KeyError/TypeError: every failure is a StageflowError subclass."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dspy
import pytest

from stageflow import (
    BranchingPipeline,
    ConfigurationError,
    ContractError,
    HierarchicalPipeline,
    IterativePipeline,
    LoopLimitError,
    QualityBasedStopping,
    RoutingError,
    SequentialPipeline,
    StageError,
    StageflowError,
    StageInput,
    StageOutput,
    StandardStage,
    stage,
)
from stageflow.testing import FakeLM, call


class NumIn(StageInput):
    number: int
    label: str


class NumOut(StageOutput):
    doubled: int | None = None


class Double(StandardStage):
    input_model, output_model = NumIn, NumOut

    def process(self, data: NumIn) -> NumOut:
        return NumOut(content=data.content, confidence=1.0, doubled=data.number * 2)


def qa() -> SequentialPipeline:
    return SequentialPipeline([dspy.Predict("question, context -> answer")])


def answer(text: str) -> Any:
    return stage(lambda question: text, writes=["answer"])


CASES: dict[str, tuple[Callable[[], Any], dict[str, Any], type[StageflowError], str]] = {
    "standard stage wrong type": (
        lambda: SequentialPipeline([Double()]),
        {"content": "c", "number": "lots", "label": "x"},
        ContractError,
        "invalid_input",
    ),
    "standard stage None": (
        lambda: SequentialPipeline([Double()]),
        {"content": "c", "number": 1, "label": None},
        ContractError,
        "invalid_input",
    ),
    "standard stage list": (
        lambda: SequentialPipeline([Double()]),
        {"content": "c", "number": [1], "label": "x"},
        ContractError,
        "invalid_input",
    ),
    "missing field": (qa, {"question": "Q"}, ContractError, "missing_input"),
    "no fields": (qa, {}, ContractError, "missing_input"),
    "misspelled field": (qa, {"question": "Q", "contxt": "C"}, ContractError, "missing_input"),
    "reserved input": (qa, {"question": "Q", "context": "C", "values": 1}, ContractError, "reserved_field"),
    "unknown branch": (
        lambda: BranchingPipeline(lambda question: "nope", {"a": answer("a")}),
        {"question": "Q"},
        RoutingError,
        "unknown_branch",
    ),
    "router returns None": (
        lambda: BranchingPipeline(lambda question: None, {"a": answer("a")}),
        {"question": "Q"},
        RoutingError,
        "empty_route",
    ),
    "router returns empty": (
        lambda: BranchingPipeline(lambda question: "", {"a": answer("a")}),
        {"question": "Q"},
        RoutingError,
        "empty_route",
    ),
    "router returns a number": (
        lambda: BranchingPipeline(lambda question: 7, {"a": answer("a")}),
        {"question": "Q"},
        RoutingError,
        "unknown_branch",
    ),
    "router returns a list": (
        lambda: BranchingPipeline(lambda question: ["a", "b"], {"a": answer("a")}),
        {"question": "Q"},
        RoutingError,
        "unknown_branch",
    ),
    "non-terminating loop": (
        lambda: IterativePipeline(
            [stage(lambda n=0: n + 1, writes=["n"])], lambda s: False, max_iterations=3, on_limit="raise"
        ),
        {},
        LoopLimitError,
        "loop_limit",
    ),
    "loop score not a number": (
        lambda: IterativePipeline([stage(lambda: "high", writes=["quality_score"])], QualityBasedStopping()),
        {},
        ContractError,
        "bad_score",
    ),
    "stage raises KeyError": (
        lambda: SequentialPipeline([stage(lambda d: d["k"], writes=["v"])]),
        {"d": {}},
        StageError,
        "stage_failed",
    ),
    "stage returns wrong shape": (
        lambda: SequentialPipeline([stage(lambda d: 5, writes=["a", "b"])]),
        {"d": 1},
        StageError,
        "bad_output",
    ),
    "stage misses declared output": (
        lambda: SequentialPipeline([stage(lambda d: {"a": 1}, writes=["a", "b"])]),
        {"d": 1},
        ContractError,
        "missing_output",
    ),
    "undeclared output not a record": (
        lambda: SequentialPipeline([stage(lambda d: 5)]),
        {"d": 1},
        StageError,
        "bad_output",
    ),
    "unknown node name": (
        lambda: HierarchicalPipeline({"root": {"type": "module", "module": answer("a")}}),
        {"stage_name": "missing", "question": "Q"},
        ConfigurationError,
        "unknown_node",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_input_is_a_stageflow_error(case: str, mode: str) -> None:
    build, inputs, expected, code = CASES[case]
    lm = FakeLM()
    pipeline = build()
    with dspy.context(lm=lm), pytest.raises(StageflowError) as ei:
        await call(pipeline, mode, **inputs)
    err = ei.value
    assert isinstance(err, expected), f"{type(err).__name__}: {err}"
    assert not isinstance(err, KeyError | TypeError)
    assert err.code == code
    assert lm.calls == 0
    assert str(err)
