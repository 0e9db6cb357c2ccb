"""``Stage``, ``CachedStage`` and ``FunctionStage`` use Python's own attribute lookup (DSPy's
``Module.__getattribute__`` hook costs more than the read on every attribute of every call) and
keep DSPy's warning about reading ``forward`` directly: warned where DSPy warns, silent where it is
silent."""

from __future__ import annotations

import logging
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import CachedStage, SequentialPipeline, Stage, stage
from stageflow.stages import FunctionStage
from stageflow.testing import FakeLM, call

_LOGGER = "dspy.primitives.module"


def _stages() -> dict[str, Any]:
    return {
        "Stage": Stage(dspy.Predict("question -> answer"), outputs={"answer": "reply"}),
        "CachedStage": CachedStage(dspy.Predict("question -> answer")),
        "FunctionStage": stage(lambda question: {"answer": question.upper()}, writes=["answer"]),
    }


@pytest.mark.parametrize("name", ["Stage", "CachedStage", "FunctionStage"])
async def test_calling_warns_nothing_and_reading_forward_warns_as_dspy_does(
    mode: str, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = _stages()[name]
    assert type(s).__getattribute__ is object.__getattribute__
    with dspy.context(lm=FakeLM({"answer": "a"})), caplog.at_level(logging.WARNING, logger=_LOGGER):
        await call(s, mode, question="q")
        await call(SequentialPipeline([s]), mode, question="q")
        assert not caplog.records
        s.forward(question="q")
    assert [r.getMessage() for r in caplog.records] == [
        f"Calling module.forward(...) on {type(s).__name__} directly is discouraged. Please use module(...) "
        "instead."
    ]


def test_the_warning_is_dspys_own_for_a_plain_module(caplog: pytest.LogCaptureFixture) -> None:
    class Plain(dspy.Module):  # type: ignore[misc]
        def forward(self, question: str) -> Any:
            return dspy.Prediction(answer=question)

    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        Plain().forward(question="q")
        stage(lambda question: {"answer": question}, writes=["answer"]).forward(question="q")
    first, second = (r.getMessage() for r in caplog.records)
    assert first.replace("Plain", "FunctionStage") == second


def test_a_subclass_forward_is_wrapped_and_super_forward_does_not_warn(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Loud(Stage):
        def forward(self, **kwargs: Any) -> Any:
            out = super().forward(**kwargs)  # (DSPy's hook does not see this read either)
            return out

    loud = Loud(stage(lambda x: {"y": x + 1}, writes=["y"]))
    assert type(Loud.__dict__["forward"]).__name__ == "ForwardAccess"
    assert Loud.forward.__name__ == "forward"  # (from the class: the function itself)
    with caplog.at_level(logging.WARNING, logger=_LOGGER):
        assert SequentialPipeline([loud])(x=1).y == 2
        assert loud(x=1)["y"] == 2
    assert not caplog.records


def test_cache_keys_still_see_a_subclass_forward() -> None:
    def make(k: int) -> type:
        class Offset(FunctionStage):
            def forward(self, **kwargs: Any) -> Any:
                return {"y": kwargs["x"] + k}

        return Offset

    a = make(1)(lambda x: None, writes=["y"])
    b = make(2)(lambda x: None, writes=["y"])
    assert stageflow.fingerprint(a) != stageflow.fingerprint(b)
