"""Replacing ``Stage.module`` after the Stage is built is refused (adversarial report).

Reproducer: ``s.module = Other()`` ran the new module under the old module's contract, so an output
only the new module returns was silently dropped from the result.
"""

from __future__ import annotations

import copy

import dspy
import pytest

import stageflow
from stageflow import ConfigurationError
from stageflow.testing import call


class Old(dspy.Module):
    def forward(self, x: str) -> dspy.Prediction:
        return dspy.Prediction(y=x + "-old")


class New(dspy.Module):
    def forward(self, x: str) -> dspy.Prediction:
        return dspy.Prediction(y=x + "-new", z="extra")


def test_replacing_the_module_is_refused_naming_the_fix() -> None:
    stage = stageflow.Stage(Old())
    with pytest.raises(ConfigurationError) as info:
        stage.module = New()
    assert info.value.field == "module"
    assert "Stage(new_module" in (info.value.hint or "")
    assert isinstance(stage.module, Old)


async def test_copies_still_work_and_replacing_the_stage_in_the_pipeline_does(mode: str) -> None:
    pipeline = stageflow.SequentialPipeline([stageflow.Stage(Old())])
    for copied in (pipeline.deepcopy(), pipeline.reset_copy(), copy.deepcopy(pipeline)):
        assert (await call(copied, mode, x="a")).y == "a-old"
    pipeline.stages[0] = stageflow.Stage(New())
    result = await call(pipeline, mode, x="a")
    assert (result.y, result.z) == ("a-new", "extra")
