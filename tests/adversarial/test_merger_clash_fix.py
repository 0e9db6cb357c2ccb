"""A clash error names every clashing field at once, and doing what it says works (user report).

Reproducer: parallel StandardStages (content, confidence, metadata, error each) were refused one
field per attempt, and following the hint — ``ResultMerger(strategies={'confidence': 'list'})`` —
dropped the default ``concatenate`` of ``content``, so the next attempt clashed on ``content``.
"""

from __future__ import annotations

import ast
import re
from typing import Any

import dspy
import pytest

from stageflow import ContractError, ParallelPipeline, ResultMerger, StageInput, StandardStage
from stageflow.testing import call


class Upper(StandardStage):
    def process(self, input_data: StageInput) -> dict[str, Any]:
        return {"content": input_data.content.upper(), "confidence": 0.9}


class Lower(StandardStage):
    def process(self, input_data: StageInput) -> dict[str, Any]:
        return {"content": input_data.content.lower(), "confidence": 0.7}


def _suggested_strategies(error: ContractError) -> dict[str, str]:
    found = re.search(r"strategies=(\{[^}]*\})", error.hint or "")
    assert found is not None, error.hint
    return dict(ast.literal_eval(found.group(1)))  # the hint's own dict literal


def test_a_build_time_clash_names_every_field_and_its_fix_works_in_one_step() -> None:
    with pytest.raises(ContractError) as caught:
        ParallelPipeline([[Upper(), Lower()]], ResultMerger())
    message = str(caught.value)
    for field in ("confidence", "metadata", "error"):
        assert f"'{field}'" in message
    suggested = _suggested_strategies(caught.value)
    assert set(suggested) == {"confidence", "metadata", "error"}
    ParallelPipeline([[Upper(), Lower()]], ResultMerger(strategies=suggested))  # builds


async def test_naming_other_fields_keeps_content_concatenated(mode: str) -> None:
    merger = ResultMerger(strategies={"confidence": "list", "metadata": "first", "error": "first"})
    pipeline = ParallelPipeline([[Upper(), Lower()]], merger)
    result = await call(pipeline, mode, content="Hello")
    assert result.content == "HELLO\nhello"
    assert result.confidence == [0.9, 0.7]


def test_a_run_time_clash_names_every_field() -> None:
    merged = [dspy.Prediction(a=1, b=2, content="x"), dspy.Prediction(a=3, b=4, content="y")]
    with pytest.raises(ContractError) as caught:
        ResultMerger().merge(merged)
    assert "'a'" in str(caught.value)
    assert "'b'" in str(caught.value)
    assert set(_suggested_strategies(caught.value)) == {"a", "b"}
    assert ResultMerger(strategies={"a": "list", "b": "first"}).merge(merged) == {
        "a": [1, 3],
        "b": 2,
        "content": "x\ny",
    }
