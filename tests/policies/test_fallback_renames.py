"""A ``Stage``'s fallback takes and gives the stage's own field names, and the Stage renames them,
whether the engine unwraps the Stage (a plain ``Stage``) or calls it as a module (a subclass of
yours, a ``Stage`` around a ``Stage``): alone, in a pipeline, sync and async."""

from __future__ import annotations

from typing import Any

import pytest

import stageflow
from stageflow import Stage
from stageflow.testing import call


def boom(x: int) -> dict[str, int]:
    raise ValueError("no")


def negate(x: int) -> dict[str, int]:
    return {"y": -x}


class Mine(Stage):
    def forward(self, **kw: Any) -> Any:
        return super().forward(**kw)


SHAPES = {
    "plain": lambda **k: Stage(boom, writes=["y"], **k),
    "subclass": lambda **k: Mine(boom, writes=["y"], **k),
    "stage-in-stage": lambda **k: Stage(Stage(boom, writes=["y"]), **k),
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("fallback", "want"), [({"y": 0}, 0), (negate, -3)], ids=["default", "stage"])
async def test_fallback_in_stage_names_is_renamed(shape: str, fallback: Any, want: int, mode: str) -> None:
    def build() -> Stage:
        return SHAPES[shape](inputs={"x": "q"}, outputs={"y": "answer"}, fallback=fallback)

    alone = await call(build(), mode, x=3)
    assert dict(alone) == {"answer": want}
    result = await call(stageflow.SequentialPipeline([build()]), mode, q=3)
    assert result.answer == want
    assert "y" not in result
    assert [e.kind for e in result.run.events] == ["fallback"]


async def test_a_default_in_state_names_still_works_for_a_subclass(mode: str) -> None:
    s = Mine(boom, writes=["y"], outputs={"y": "answer"}, fallback={"answer": 5})
    result = await call(stageflow.SequentialPipeline([s]), mode, x=1)
    assert result.answer == 5
