"""Errors name the stage they are about, with what it runs (verify-s22 user #7, #8)."""

from __future__ import annotations

import time

import dspy
import pytest

import stageflow
from stageflow import ContractError, ForEach, SequentialPipeline, Stage, StageTimeoutError
from stageflow.testing import call


def slow(x: int) -> dict[str, int]:
    time.sleep(0.5)
    return {"y": x}


async def test_a_timeout_in_a_pipeline_names_the_stage_and_its_function(mode: str) -> None:
    pipeline = SequentialPipeline([Stage(slow, writes=["y"], timeout=0.05)])
    with pytest.raises(StageTimeoutError) as info:
        await call(pipeline, mode, x=1)
    assert str(info.value).startswith("Stage 'stages[0]' (function slow()) took longer than its timeout")


async def test_a_timeout_alone_names_the_stage_once(mode: str) -> None:
    with pytest.raises(StageTimeoutError) as info:
        await call(Stage(slow, writes=["y"], timeout=0.05), mode, x=1)
    assert str(info.value).startswith("Stage(function slow()) took longer than its timeout")


async def test_foreach_over_text_names_its_stage(mode: str) -> None:
    pipeline = SequentialPipeline(
        [
            stageflow.stage(lambda question: {"subs": "a? b?"}, writes=["subs"]),
            ForEach(dspy.Predict("sub -> fact"), over="subs", item="sub", collect="facts"),
        ]
    )
    with pytest.raises(ContractError) as info:
        await call(pipeline, mode, question="q")
    assert info.value.stage_path == "stages[1]"
    assert info.value.code == "not_a_list"
    assert "for its stage (Predict(sub -> fact))" in str(info.value)


def test_a_reserved_name_written_by_a_stage_is_not_called_the_callers_input() -> None:
    pipeline = SequentialPipeline(
        [
            stageflow.stage(lambda question: {"items": ["a", "b"]}),
            ForEach(dspy.Predict("item -> fact"), over="items", item="item", collect="facts"),
        ]
    )
    with pytest.raises(ContractError) as info:
        pipeline(question="q")
    assert info.value.code == "reserved_field"
    assert info.value.field == "items"
    assert "written by an earlier stage" in str(info.value)
    assert "outputs={'items': 'items_value'}" in str(info.value)
