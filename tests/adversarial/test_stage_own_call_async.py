"""A ``Stage`` subclass with only a ``__call__`` of its own gives the same result under ``acall``.

Before: ``acall`` went through DSPy's ``acall`` to ``aforward`` and skipped that ``__call__``, so a
pipeline returned one answer called synchronously and another under ``acall`` (silently). Now
``acall`` runs the ``__call__`` of yours on a worker thread; a class with an ``acall`` or
``aforward`` of its own keeps it.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from typing import Any

import dspy
import pytest

import stageflow
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


# -- helper 87's attack ----------------------------------------------------------------------------


class Facade(Stage):
    """A sync ``__call__`` that runs the async path itself: under acall it must not come back to it."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return asyncio.run(super().acall(**kwargs))


def test_a_call_that_runs_acall_itself_does_not_recurse() -> None:
    before = threading.active_count()
    assert Facade(Echo())(question="q").answer == "wrapped:q"  # (asyncio.run needs no running loop)
    assert asyncio.run(Facade(Echo()).acall(question="q")).answer == "wrapped:q"
    assert threading.active_count() <= before + 8  # (not hundreds of threads)


class Stops(Stage):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise StopIteration


def test_stop_iteration_in_your_call_fails_instead_of_hanging(mode: str) -> None:
    async def bounded() -> Any:
        return await asyncio.wait_for(call(Stops(Echo()), mode, question="q"), 10)

    with pytest.raises((StopIteration, RuntimeError)):
        asyncio.run(bounded())
    p = SequentialPipeline([Stops(Echo(), writes=["answer"])])
    with pytest.raises(Exception, match="StopIteration"):
        asyncio.run(asyncio.wait_for(call(p, mode, question="q"), 10))


def test_stop_iteration_in_a_function_stage_under_acall_fails_instead_of_hanging() -> None:
    def f(x: int) -> dict[str, int]:
        raise StopIteration

    s = stageflow.stage(f, writes=["y"])
    with pytest.raises(RuntimeError, match="f raised StopIteration"):
        asyncio.run(asyncio.wait_for(s.acall(x=1), 10))


class AsyncCall(Stage):
    async def __call__(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        await asyncio.sleep(0)
        return {"answer": f"async:{kwargs['question']}"}


def test_an_async_call_of_yours_is_awaited_both_ways(mode: str) -> None:
    assert asyncio.run(call(AsyncCall(Echo(), writes=["answer"]), mode, question="q")) == {
        "answer": "async:q"
    }
    p = SequentialPipeline([AsyncCall(Echo(), writes=["answer"])])
    assert asyncio.run(call(p, mode, question="q")).answer == "async:q"


class _Traced:
    """A class-based decorator, as tracing libraries write them."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __get__(self, obj: Any, owner: Any) -> Any:
        return functools.partial(self, obj)

    def __call__(self, obj: Any, *args: Any, **kwargs: Any) -> Any:
        out = self.fn(obj, *args, **kwargs)
        return {"answer": out["answer"] + "-traced"}


class Decorated(Stage):
    @_Traced
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return {"answer": kwargs["question"]}


def test_a_decorated_call_of_yours_runs_both_ways(mode: str) -> None:
    assert Decorated.stageflow_call_only
    out = asyncio.run(call(Decorated(Echo(), writes=["answer"]), mode, question="q"))
    assert out["answer"] == "q-traced"
    p = SequentialPipeline([Decorated(Echo(), writes=["answer"])])
    assert asyncio.run(call(p, mode, question="q")).answer == "q-traced"
