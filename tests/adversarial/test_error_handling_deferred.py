"""ErrorHandlingPipeline reports a deferred field that never appears as the contract error it is.

Reproducer (issues 8 and 9): with an undeclared upstream module that did not produce ``title``, the
error read "stage None ('stages[1]') failed and was not recovered: KeyError: 'title'" instead of
the ContractError a SequentialPipeline raises (stage path, field, what is available, the fix).
"""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ContractError, PipelineError
from stageflow.testing import call

read: list[str] = []


class Ext(dspy.Module):
    def forward(self, text: str) -> dspy.Prediction:
        return dspy.Prediction(words=len(text))


class Reader(dspy.Module):
    def forward(self, title: str) -> dspy.Prediction:
        read.append(title)
        return dspy.Prediction(loud=title.upper())


@pytest.mark.parametrize("kind", [stageflow.SequentialPipeline, stageflow.ErrorHandlingPipeline])
async def test_the_deferred_contract_error_is_the_same_in_both_pipelines(kind: Any, mode: str) -> None:
    read.clear()
    with pytest.raises(ContractError) as info:
        await call(kind([Ext(), Reader()]), mode, text="x")
    err = info.value
    assert not isinstance(err, PipelineError)
    assert err.stage_path == "stages[1]"
    assert err.field == "title"
    assert err.code == "missing_input"
    assert "Available: ['text', 'words']" in err.message
    assert "'stages[0]' returned ['words']" in err.message
    assert "return 'title' from 'stages[0]'" in (err.hint or "")
    assert "KeyError" not in str(err)
    assert read == []  # the stage that needs it never ran


async def test_a_stage_failure_is_still_reported_as_unrecovered(mode: str) -> None:
    def boom(words: int) -> dict[str, Any]:
        raise ValueError("bad")

    pipeline = stageflow.ErrorHandlingPipeline([Ext(), stageflow.stage(boom, writes=["x"])])
    with pytest.raises(
        PipelineError, match=r"stage 1 \('stages\[1\]'\) failed and was not recovered: ValueError"
    ):
        await call(pipeline, mode, text="x")
