"""A ``Stage`` subclass with only a ``__call__`` of its own gives the same result under ``acall``.

Before: ``acall`` went through DSPy's ``acall`` to ``aforward`` and skipped that ``__call__``, so a
pipeline returned one answer called synchronously and another under ``acall`` (silently). Now
``acall`` runs the ``__call__`` of yours on a worker thread; a class with an ``acall`` or
``aforward`` of its own keeps it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import dspy
import pytest

from stageflow import SequentialPipeline, Stage
from stageflow.testing import call


class Echo(dspy.Module):  # type: ignore[misc]
    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(answer=f"wrapped:{question}")

    async def aforward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(answer=f"wrapped:{question}")


class Custom(Stage):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        on_main = threading.current_thread() is threading.main_thread()
        return {"answer": f"custom:{kwargs['question']}:{on_main}"}


class CustomWithAsync(Custom):
    async def acall(self, *args: Any, **kwargs: Any) -> Any:
        return {"answer": "own-acall"}


def test_own_call_runs_under_acall_in_a_pipeline(mode: str) -> None:
    p = SequentialPipeline([Custom(Echo(), writes=["answer"])])
    answer = asyncio.run(call(p, mode, question="q")).answer
    assert answer.startswith("custom:q:")


def test_own_call_runs_under_acall_alone(mode: str) -> None:
    out = asyncio.run(call(Custom(Echo(), writes=["answer"]), mode, question="q"))
    assert out["answer"].startswith("custom:q:")


def test_under_acall_it_runs_off_the_event_loop_thread() -> None:
    out = asyncio.run(Custom(Echo(), writes=["answer"]).acall(question="q"))
    assert out["answer"] == "custom:q:False"


def test_an_own_acall_is_kept() -> None:
    s = CustomWithAsync(Echo(), writes=["answer"])
    assert asyncio.run(s.acall(question="q")) == {"answer": "own-acall"}
    assert s(question="q")["answer"].startswith("custom:q:")
    assert not CustomWithAsync.stageflow_call_only
    assert Custom.stageflow_call_only


@pytest.mark.parametrize("base", [Stage])
def test_library_classes_keep_their_async_path(base: type) -> None:
    assert not base.stageflow_call_only
    out = asyncio.run(base(Echo()).acall(question="q"))
    assert out.answer == "wrapped:q"
