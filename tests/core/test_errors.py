"""Error hierarchy, structured fields, path prefixes, and exact message snapshots."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow import (
    BranchingPipeline,
    ConfigurationError,
    ContractError,
    IterativePipeline,
    LoopLimitError,
    PipelineError,
    QualityBasedStopping,
    RoutingError,
    SequentialPipeline,
    Stage,
    StageError,
    StageflowError,
    stage,
)
from stageflow.testing import FakeLM


def test_hierarchy_and_default_codes() -> None:
    expected = {
        ContractError: "contract",
        ConfigurationError: "configuration",
        RoutingError: "unknown_branch",
        StageError: "stage_failed",
        PipelineError: "pipeline_failed",
        LoopLimitError: "loop_limit",
    }
    for cls, code in expected.items():
        err = cls("msg")
        assert isinstance(err, StageflowError)
        assert not isinstance(err, KeyError)
        assert err.code == code
    assert StageflowError("m").code == "stageflow_error"


def test_structured_fields_and_hint_in_str() -> None:
    err = ContractError("Something failed.", stage_path="stages[0]", field="x", code="custom", hint="do this")
    assert (err.stage_path, err.field, err.code, err.hint) == ("stages[0]", "x", "custom", "do this")
    assert str(err) == "Something failed.\nFix: do this"
    assert str(ContractError("No hint.")) == "No hint."


def test_with_path_prefix_rewrites_quoted_path_and_args() -> None:
    err = StageError("Stage 'stages[0]' (f) raised.", stage_path="stages[0]")
    assert err.with_path_prefix("stages[2]") is err
    assert err.stage_path == "stages[2].stages[0]"
    assert err.message == "Stage 'stages[2].stages[0]' (f) raised."
    assert err.args == ("Stage 'stages[2].stages[0]' (f) raised.",)
    assert err.with_path_prefix("").stage_path == "stages[2].stages[0]"
    bare = LoopLimitError("limit")
    bare.with_path_prefix("stages[1]")
    assert bare.stage_path == "stages[1]"
    assert str(bare) == "limit"


def test_errors_are_exported_from_package() -> None:
    for name in (
        "StageflowError",
        "ContractError",
        "ConfigurationError",
        "RoutingError",
        "StageError",
        "PipelineError",
        "LoopLimitError",
    ):
        assert issubclass(getattr(stageflow, name), Exception)
    with pytest.raises(AttributeError):
        _ = stageflow.NoSuchName  # type: ignore[attr-defined]


def test_stage_exception_becomes_stage_error_with_cause() -> None:
    original = ValueError("bad thing")

    def boom(text: str) -> dict[str, Any]:
        raise original

    p = SequentialPipeline([stage(boom, writes=["x"])])
    with pytest.raises(StageError) as ei:
        p(text="t")
    assert ei.value.__cause__ is original
    assert ei.value.stage_path == "stages[0]"
    assert ei.value.code == "stage_failed"


def test_key_error_inside_a_stage_is_wrapped_not_bare() -> None:
    p = SequentialPipeline([stage(lambda data: {"v": data["missing"]}, writes=["v"])])
    with pytest.raises(StageError) as ei:
        p(data={})
    assert isinstance(ei.value.__cause__, KeyError)
    assert not isinstance(ei.value, KeyError)


# -- exact message snapshots (messages must not drift) -------------------------------------


def test_snapshot_missing_input() -> None:
    lm = FakeLM()
    p = SequentialPipeline([dspy.Predict("question -> draft"), dspy.Predict("context, draft -> answer")])
    with dspy.context(lm=lm), pytest.raises(ContractError) as ei:
        p(question="Q")
    assert str(ei.value) == (
        "Stage 'stages[1]' (Predict(context, draft -> answer)) needs input 'context', which is not "
        "available there. Available: ['draft', 'question'] (pipeline inputs: ['question']; "
        "'draft' from 'stages[0]').\n"
        "Fix: pass context=... when calling the pipeline; "
        "or produce 'context' in a stage before 'stages[1]'; "
        "or feed it from an existing field: Stage(<stage>, inputs={'context': 'draft'})"
    )


def test_snapshot_unknown_branch() -> None:
    b = BranchingPipeline(
        lambda question: "Weird Thing",
        {
            "Math": stage(lambda question: "4", writes=["answer"]),
            "chat": stage(lambda question: "hi", writes=["answer"]),
        },
    )
    with pytest.raises(RoutingError) as ei:
        b(question="Q")
    assert str(ei.value) == (
        "The router chose branch 'Weird Thing' (normalised 'weird_thing'), which does not exist. "
        "Known branches: ['chat', 'math'].\n"
        "Fix: pass default='<branch>' to BranchingPipeline, or constrain the router with "
        "stageflow.lm_router([...])"
    )


def test_snapshot_loop_limit() -> None:
    @stage(writes=["count", "quality_score"])
    def step(count: int = 0) -> dict[str, Any]:
        return {"count": count + 1, "quality_score": (count + 1) / 10}

    loop = IterativePipeline(
        [step], QualityBasedStopping(quality_threshold=0.9, patience=2), max_iterations=3, on_limit="raise"
    )
    with pytest.raises(LoopLimitError) as ei:
        loop()
    assert str(ei.value) == (
        "IterativePipeline stopped after max_iterations=3 without its stopping condition "
        "(QualityBasedStopping(quality_threshold=0.9, patience=2)) firing.\n"
        "Fix: raise max_iterations, relax the condition, or pass on_limit='return'"
    )


def test_snapshot_bad_rename() -> None:
    with pytest.raises(ConfigurationError) as ei:
        Stage(dspy.Predict("question -> answer"), inputs={"qestion": "q"})
    assert str(ei.value) == (
        "Stage(Predict(question -> answer)): inputs={'qestion': 'q'} renames ['qestion'], but the stage's "
        "inputs are ['question'].\n"
        "Fix: keys of inputs= are the stage's own field names; values are state field names"
    )


def test_snapshot_empty_route() -> None:
    b = BranchingPipeline(lambda question: "", {"math": stage(lambda question: "4", writes=["answer"])})
    with pytest.raises(RoutingError) as ei:
        b(question="Q")
    assert str(ei.value) == (
        "The router (function <lambda>()) returned no branch name (got ''). Known branches: ['math'].\n"
        "Fix: make the router return one of the branch names, or pass default=..."
    )


def test_snapshot_nested_stage_error() -> None:
    def boom(text: str) -> dict[str, Any]:
        raise ValueError("bad thing")

    p = SequentialPipeline(
        [stage(lambda text: {"y": 1}, writes=["y"]), SequentialPipeline([stage(boom, writes=["x"])])]
    )
    with pytest.raises(StageError) as ei:
        p(text="t")
    assert str(ei.value) == "Stage 'stages[1].stages[0]' (function boom()) raised ValueError: bad thing"
