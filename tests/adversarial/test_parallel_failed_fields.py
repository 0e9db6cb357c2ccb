"""A field a failed parallel stage was to write is never served stale (issue 9).

Reproducer: with the default ``on_error="collect"``, when the stage that writes ``answer`` failed, a
later stage ran on the *caller's* old ``answer`` and the run reported success. The field is now
dropped and listed in ``result.failed_outputs``; the stage that needs it fails at its boundary
with a ContractError naming the failed stage and the field, in the same pipeline or an outer one.
"""

from __future__ import annotations

from typing import Any

import pytest

import stageflow
from stageflow import ContractError, PipelineError
from stageflow.testing import call

used: list[str] = []


@stageflow.stage(writes=["answer"])
def failing(question: str) -> dict[str, Any]:
    raise ValueError("model down")


@stageflow.stage(writes=["other"])
def other(question: str) -> dict[str, Any]:
    return {"other": 1}


@stageflow.stage(writes=["final"])
def use(answer: str) -> dict[str, Any]:
    used.append(answer)
    return {"final": "used " + answer}


@pytest.fixture(autouse=True)
def _clear() -> None:
    used.clear()


def _names_the_failure(error: BaseException) -> None:
    text = str(error)
    assert "needs input 'answer'" in text
    assert "'stages[0]" in text
    assert "failing()" in text
    assert "ValueError: model down" in text


@pytest.mark.parametrize("on_error", ["collect", "skip"])
async def test_a_later_group_never_runs_on_the_callers_old_value(mode: str, on_error: Any) -> None:
    par = stageflow.ParallelPipeline([[failing, other], [use]], on_error=on_error)
    with pytest.raises(PipelineError) as info:
        await call(par, mode, question="q", answer="STALE")
    assert used == []
    cause = info.value.__cause__
    assert isinstance(cause, ContractError)
    assert cause.field == "answer"
    assert cause.stage_path == "stages[2]"
    _names_the_failure(cause)


async def test_a_stage_after_the_parallel_pipeline_fails_at_its_boundary_too(mode: str) -> None:
    outer = stageflow.SequentialPipeline([stageflow.ParallelPipeline([[failing, other]]), use])
    with pytest.raises(ContractError) as info:
        await call(outer, mode, question="q", answer="STALE")
    assert used == []
    assert info.value.stage_path == "stages[1]"
    assert info.value.field == "answer"
    assert "'stages[0].stages[0]' (function failing())" in str(info.value)


async def test_with_no_reader_the_run_succeeds_and_the_failure_stays_on_the_result(mode: str) -> None:
    par = stageflow.ParallelPipeline([[failing, other]])
    result = await call(par, mode, question="q", answer="STALE")
    assert "answer" not in result  # not the caller's value presented as the stage's output
    assert result.other == 1
    assert set(result.failed_outputs) == {"answer"}
    assert "ValueError: model down" in result.failed_outputs["answer"]
    assert result.group_reports[0]["stages[0]"]["status"] == "error"
    assert [e.kind for e in result.run.events] == ["stage_failed"]


async def test_a_later_group_that_writes_the_field_again_clears_it(mode: str) -> None:
    rewrite = stageflow.stage(lambda other: {"answer": f"fresh {other}"}, writes=["answer"], name="rewrite")
    par = stageflow.ParallelPipeline([[failing, other], [rewrite], [use]])
    result = await call(par, mode, question="q", answer="STALE")
    assert result.final == "used fresh 1"
    assert "failed_outputs" not in result.run.extras


async def test_two_levels_down_the_old_value_is_dropped_too(mode: str) -> None:
    middle = stageflow.SequentialPipeline([stageflow.ParallelPipeline([[failing, other]])])
    outer = stageflow.SequentialPipeline([middle, use])
    with pytest.raises(ContractError) as info:
        await call(outer, mode, question="q", answer="STALE")
    assert used == []
    assert "'stages[0].stages[0].stages[0]' (function failing())" in str(info.value)


# Second attack round: a parallel group nested in another, and a failed member with undeclared outputs.


async def test_a_failed_field_of_a_nested_parallel_group_is_dropped_by_the_outer_group(mode: str) -> None:
    inner = stageflow.ParallelPipeline([[failing, other]])
    outer = stageflow.ParallelPipeline([[inner, stageflow.stage(lambda question: {"h": 1}, writes=["h"])]])
    result = await call(outer, mode, question="q", answer="STALE")
    assert "answer" not in result
    assert "answer" in result.failed_outputs
    wrapped = await call(stageflow.SequentialPipeline([inner]), mode, question="q", answer="STALE")
    assert "answer" not in wrapped
    assert "answer" in wrapped.failed_outputs  # reachable from the outer result too
    with pytest.raises((ContractError, PipelineError)):
        await call(stageflow.SequentialPipeline([outer, use]), mode, question="q", answer="STALE")
    assert used == []


async def test_a_failed_member_with_undeclared_outputs_is_said_out_loud(mode: str) -> None:
    # Its fields are unknown, so none can be dropped (the tutorial leaves a failed stage out of the
    # merge): the run warns, and result.failed_outputs names the stage, so the risk is never silent.
    import dspy

    from stageflow.patterns.parallel import UndeclaredFailureWarning

    class Undeclared(dspy.Module):
        def forward(self, question: str) -> dspy.Prediction:
            raise ValueError("undeclared failed")

    pipeline = stageflow.ParallelPipeline([[Undeclared(), other]])
    with pytest.warns(UndeclaredFailureWarning, match="writes="):
        result = await call(pipeline, mode, question="q", answer="STALE")
    [(key, why)] = result.failed_outputs.items()
    assert "stages[0]" in key
    assert "undeclared failed" in why
