"""A LazyStage in a pipeline takes exactly what the stage it wraps takes (issue 9).

Reproducer: ``SequentialPipeline([LazyStage(double)])`` passed the whole state to ``double``, so any
extra input crashed the run with a raw ``TypeError`` while ``check()`` said the pipeline was fine.
"""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ContractError
from stageflow.testing import call


@stageflow.stage(writes=["y"])
def double(x: int) -> dict[str, int]:
    return {"y": x * 2}


class Shout(dspy.Module):
    def forward(self, text: str) -> dspy.Prediction:
        return dspy.Prediction(loud=text.upper())


@pytest.mark.parametrize(
    ("wrapped", "inputs", "field", "expected"),
    [
        (double, {"x": 2, "other": 1}, "y", 4),
        (stageflow.stage(lambda x: x * 2, writes=["y"], name="single"), {"x": 2, "other": 1}, "y", 4),
        (Shout(), {"text": "hi", "other": 1}, "loud", "HI"),
    ],
    ids=["function", "single-output function", "module"],
)
async def test_only_the_wrapped_stages_inputs_are_passed(
    wrapped: Any, inputs: dict[str, Any], field: str, expected: Any, mode: str
) -> None:
    pipeline = stageflow.SequentialPipeline(
        [stageflow.LazyStage(wrapped), stageflow.stage(lambda other: {"seen": other}, writes=["seen"])]
    )
    result = await call(pipeline, mode, **inputs)
    assert result[field] == expected
    assert result.seen == 1


def test_the_contract_is_the_wrapped_stages() -> None:
    pipeline = stageflow.SequentialPipeline([stageflow.LazyStage(double)])
    assert "y" in pipeline.check(["x", "other"])  # its declared output is known before the run
    with pytest.raises(ContractError, match="needs input 'x'"):
        pipeline.check(["other"])
