"""The fast path is on for predictors inside pipelines, off per pipeline or globally, invisible to DSPy."""

from __future__ import annotations

import dspy
import pytest

import stageflow
from stageflow.lm.fast import fast_path_stats, reset_fast_path_stats
from stageflow.testing import FakeLM, call


def qa() -> stageflow.SequentialPipeline:
    return stageflow.SequentialPipeline(
        [dspy.Predict("question -> draft"), dspy.ChainOfThought("question, draft -> answer")]
    )


async def test_predictors_in_pipelines_take_the_fast_path_by_default(mode: str) -> None:
    reset_fast_path_stats()
    lm = FakeLM({"draft": "d", "answer": "42"})
    with dspy.context(lm=lm):
        result = await call(qa(), mode, question="q")
    assert result.answer == "42"
    assert fast_path_stats().fast_calls == 2
    assert lm.calls == 2


async def test_the_fast_path_can_be_switched_off_per_pipeline(mode: str) -> None:
    reset_fast_path_stats()
    p = qa()
    p.fast_path = False
    with dspy.context(lm=FakeLM({"draft": "d", "answer": "42"})):
        assert (await call(p, mode, question="q")).answer == "42"
    assert fast_path_stats().fast_calls == 0


async def test_the_fast_path_can_be_switched_off_globally(mode: str) -> None:
    reset_fast_path_stats()
    stageflow.configure(fast_path=False)
    try:
        with dspy.context(lm=FakeLM({"draft": "d", "answer": "42"})):
            assert (await call(qa(), mode, question="q")).answer == "42"
    finally:
        stageflow.configure(fast_path=True)
    assert fast_path_stats().fast_calls == 0


async def test_fast_and_plain_runs_send_the_same_prompts_and_record_the_same_history(mode: str) -> None:
    prompts: dict[bool, list[tuple[str, ...]]] = {}
    histories: dict[bool, list[list[dict[str, str]]]] = {}
    for fast in (True, False):
        lm = FakeLM({"draft": "d", "answer": "42"})
        p = qa()
        p.fast_path = fast
        with dspy.context(lm=lm):
            await call(p, mode, question="Why?")
        prompts[fast] = [tuple(sorted(inputs.items())) for _, inputs in lm.log]
        histories[fast] = [entry["messages"] for entry in lm.history]
    assert prompts[True] == prompts[False]
    assert histories[True] == histories[False]


def test_the_user_adapter_is_honoured_through_its_fast_twin() -> None:
    reset_fast_path_stats()
    lm = FakeLM({"draft": "d", "answer": "42"})
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        assert qa()(question="q").answer == "42"
    assert fast_path_stats().fast_calls == 2


def test_the_fast_path_outside_pipelines_leaves_dspy_alone() -> None:
    reset_fast_path_stats()
    with dspy.context(lm=FakeLM({"answer": "4"})):
        assert dspy.Predict("question -> answer")(question="q").answer == "4"
    assert fast_path_stats().fast_calls == 0


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_configure_refuses_a_non_bool_fast_path(bad: object) -> None:
    with pytest.raises(stageflow.ConfigurationError):
        stageflow.configure(fast_path=bad)
