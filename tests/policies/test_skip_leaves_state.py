"""A skipped stage is left out of the run as if absent (README, ErrorHandlingPipeline): a field it
would have written keeps the value it had before it, and a later stage that reads a field nothing
produced fails at its boundary, naming it and the stage skipped before it."""

from __future__ import annotations

import pytest

import stageflow
from stageflow import ErrorHandlingPipeline, SequentialPipeline, Stage
from stageflow.errors import ContractError
from stageflow.testing import call


@stageflow.stage(writes=["answer"])
def cheap(question: str) -> dict[str, str]:
    return {"answer": f"cheap {question}"}


@stageflow.stage(writes=["answer"])
def expensive(question: str) -> dict[str, str]:
    raise TimeoutError("the big model is slow")


@stageflow.stage(writes=["final"])
def publish(answer: str) -> dict[str, str]:
    return {"final": f"published: {answer}"}


async def test_an_earlier_stages_value_stands_when_a_later_writer_is_skipped(mode: str) -> None:
    pipeline = SequentialPipeline([cheap, Stage(expensive, skip_on=[TimeoutError]), publish])
    result = await call(pipeline, mode, question="q")
    assert result.final == "published: cheap q"
    assert [(e.kind, e.stage) for e in result.run.events] == [("skipped", "stages[1]")]


async def test_a_field_nothing_produced_fails_at_the_readers_boundary(mode: str) -> None:
    pipeline = ErrorHandlingPipeline([expensive, publish])
    with pytest.raises(ContractError, match="answer") as info:
        await call(pipeline, mode, question="q")
    assert "Skipped earlier in this run, writing nothing: 'stages[0]' (TimeoutError" in str(info.value)
    assert "fallback=" in str(info.value)
