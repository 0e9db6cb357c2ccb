"""A function stage that returns a bare value, with ``outputs=`` renames: called on its own it
returns the value (as without renames) when the stage declares that one output, and fails with a
clear ``StageError`` when nothing names it; a pipeline stores it under the renamed name, through
any number of ``Stage`` layers."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow import Stage, stage
from stageflow.errors import StageError
from stageflow.testing import call


def add_one(x: int) -> int:
    return x + 1


@pytest.mark.parametrize(
    "build",
    [
        lambda: Stage(add_one, writes=["y"], outputs={"y": "answer"}),
        lambda: Stage(stage(add_one, writes=["y"]), outputs={"y": "answer"}),
        lambda: Stage(Stage(add_one, writes=["y"]), outputs={"y": "answer"}),
    ],
    ids=["writes", "function-stage", "stage-in-stage"],
)
async def test_single_declared_output_is_returned_alone_and_stored_renamed(build: Any, mode: str) -> None:
    assert await call(build(), mode, x=1) == 2
    result = await call(stageflow.SequentialPipeline([build()]), mode, x=1)
    assert result.answer == 2
    assert "y" not in result


async def test_renames_through_two_stage_layers(mode: str) -> None:
    inner = Stage(add_one, writes=["y"], outputs={"y": "answer"})
    outer = Stage(inner, outputs={"answer": "final"})
    assert await call(outer, mode, x=1) == 2
    result = await call(stageflow.SequentialPipeline([Stage(inner, outputs={"answer": "final"})]), mode, x=1)
    assert result.final == 2
    assert "answer" not in result


async def test_nothing_names_the_value_alone(mode: str) -> None:
    s = Stage(add_one, outputs={"y": "answer"})
    with pytest.raises(StageError) as info:
        await call(s, mode, x=1)
    assert info.value.code == "bad_output"
    assert "returned int" in str(info.value)
    assert "add_one" in str(info.value)
    assert "outputs={'y': 'answer'}" in str(info.value)


async def test_a_module_returning_a_bare_value_is_refused_alone(mode: str) -> None:
    class Bare(dspy.Module):  # type: ignore[misc]
        def forward(self, x: int) -> int:
            return x + 1

        async def aforward(self, x: int) -> int:
            return x + 1

    s = Stage(Bare(), writes=["y"], outputs={"y": "answer"})
    with pytest.raises(StageError, match="returned int"):
        await call(s, mode, x=1)


@pytest.mark.parametrize("out", [{"y": 2}, dspy.Prediction(y=2)], ids=["dict", "prediction"])
async def test_records_are_still_renamed_alone(out: Any, mode: str) -> None:
    s = Stage(lambda x: out, writes=["y"], outputs={"y": "answer"})
    got = await call(s, mode, x=1)
    assert isinstance(got, dspy.Prediction)
    assert got.answer == 2
    assert "y" not in got


async def test_a_subclass_around_a_bare_module_is_refused_alone_as_in_a_pipeline(mode: str) -> None:
    class Bare(dspy.Module):  # type: ignore[misc]
        def forward(self, x: int) -> int:
            return x + 1

    class Mine(Stage):
        def forward(self, **kw: Any) -> Any:
            return super().forward(**kw)

    def build() -> Stage:
        return Stage(Mine(Bare(), writes=["y"]), outputs={"y": "answer"})

    with pytest.raises(StageError, match="returned int"):
        await call(build(), mode, x=1)
    with pytest.raises(StageError, match="returned int"):
        await call(stageflow.SequentialPipeline([build()]), mode, x=1)
