"""A function stage with one declared output that forgot its ``return`` fails loudly.

Before: ``@stage(writes=["answer"])`` around a function with no ``return <value>`` wrote ``None`` as
the answer, in a pipeline and called alone (a silent wrong result). Now that ``None`` is a
``StageError`` (code ``bad_output``) naming the stage and the field, when the function cannot mean
it: the code that runs has no ``return <value>`` at all (unless annotated ``-> X | None``). A
function that returns a value on some path still writes a ``None`` it returns, and so does
``return {"answer": None}``. Cases from helper 87's attack: ``Stage(fn, writes=)`` alone,
``Stage(Stage(...))`` and subclasses in a pipeline, a decorator's wrapper read itself (not the
function it wraps), ``lru_cache`` read through, annotated stubs, type aliases.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Hashable
from typing import Any, NewType, Optional

import pytest

import stageflow
from stageflow import ForEach, SequentialPipeline, StageError, stage
from stageflow._returns import none_is_wrong
from stageflow.testing import call


def _forgot(question: str):  # type: ignore[no-untyped-def]
    question.upper()


async def _aforgot(question: str):  # type: ignore[no-untyped-def]
    await asyncio.sleep(0)
    question.upper()


def _typed(question: str) -> str:
    if question:
        return question.upper()
    return None  # type: ignore[return-value]  # (a wrong annotation: the None is still written)


def _optional(question: str) -> str | None:
    return question.upper() if question else None


def _old_optional(question: str) -> Optional[str]:  # noqa: UP045
    return question.upper() if question else None


def _unannotated(question: str):  # type: ignore[no-untyped-def]
    if question:
        return question.upper()
    return None


@pytest.mark.parametrize("fn", [_forgot, _aforgot], ids=["no-return", "async-no-return"])
def test_a_forgotten_return_in_a_pipeline_names_the_stage_and_the_field(fn: Any, mode: str) -> None:
    p = SequentialPipeline([stage(fn, writes=["answer"])])
    with pytest.raises(StageError) as info:
        asyncio.run(call(p, mode, question=""))
    err = info.value
    assert err.code == "bad_output"
    assert err.field == "answer"
    assert err.stage_path == "stages[0]"
    assert "returned None for its output 'answer'" in str(err)
    assert "{'answer': None}" in str(err)


@pytest.mark.parametrize("fn", [_forgot, _aforgot], ids=["no-return", "async-no-return"])
def test_a_forgotten_return_called_alone_is_refused(fn: Any, mode: str) -> None:
    s = stage(fn, writes=["answer"])
    with pytest.raises(StageError, match="returned None for its output 'answer'") as info:
        asyncio.run(call(s, mode, question=""))
    assert info.value.field == "answer"


def test_the_error_says_why_none_cannot_be_meant() -> None:
    with pytest.raises(StageError, match="no `return <value>` statement") as info:
        SequentialPipeline([stage(_forgot, writes=["answer"])])(question="q")
    assert "(a forgotten `return`?)." in str(info.value)


@pytest.mark.parametrize(
    "fn", [_optional, _old_optional, _unannotated, _typed], ids=["union", "Optional", "unannotated", "typed"]
)
def test_a_none_that_may_be_meant_is_written(fn: Any, mode: str) -> None:
    p = SequentialPipeline([stage(fn, writes=["answer"])])
    assert asyncio.run(call(p, mode, question="")).answer is None
    assert asyncio.run(call(p, mode, question="q")).answer == "Q"
    assert asyncio.run(call(stage(fn, writes=["answer"]), mode, question="")) is None


def test_none_returned_in_a_dict_is_written_on_purpose(mode: str) -> None:
    def explicit(question: str) -> dict[str, Any]:
        return {"answer": None}

    p = SequentialPipeline([stage(explicit, writes=["answer"])])
    assert asyncio.run(call(p, mode, question="q")).answer is None


def test_a_forgotten_return_inside_a_foreach_fails_the_item(mode: str) -> None:
    fe = ForEach(stage(_forgot, reads=["question"], writes=["answer"]), over="questions", item="question")
    with pytest.raises(stageflow.StageflowError, match="returned None for its output 'answer'"):
        asyncio.run(call(SequentialPipeline([fe]), mode, questions=["a", "b"]))


def test_the_code_that_runs_is_read() -> None:
    def passes_on(f: Any) -> Any:
        @functools.wraps(f)
        def inner(*a: Any, **k: Any) -> Any:
            return f(*a, **k)

        return inner

    def forgets(f: Any) -> Any:
        @functools.wraps(f)
        def inner(*a: Any, **k: Any) -> None:
            f(*a, **k)

        return inner

    class Callable:
        def __call__(self, question: str) -> None:
            question.upper()

    # A wrapper is what runs: it is read, not the function it wraps.
    assert none_is_wrong(passes_on(_forgot)) is None
    assert none_is_wrong(forgets(_shout)) == "it has no `return <value>` statement"
    # A wrapper without Python code is read through.
    assert none_is_wrong(functools.lru_cache(_forgot)) == "it has no `return <value>` statement"
    assert none_is_wrong(functools.partial(_forgot)) == "it has no `return <value>` statement"
    assert none_is_wrong(Callable()) == "it has no `return <value>` statement"
    assert none_is_wrong(print) is None  # (no code to read: cannot be told)
    assert none_is_wrong(lambda q: q or None) is None
    assert none_is_wrong(lambda q: None) is None  # (a lambda says what it returns)
    # A return shared by two branches (the compiler merges `return x if c else None`) returns a value.
    assert none_is_wrong(_optional) is None


def _shout(question: str) -> str:
    return question.upper()


MaybeStr = Optional[str]  # noqa: UP045
MaybeId = NewType("MaybeId", Optional[str])  # type: ignore[misc]  # noqa: UP045


def test_a_stub_annotated_to_return_none_as_a_value_is_not_refused() -> None:
    def stub(question: str) -> str | None:
        pass

    def alias(question: str) -> MaybeStr:
        return None

    def newtype(question: str) -> MaybeId:  # type: ignore[valid-type]
        return None

    def hashable(question: str) -> Hashable:
        return None

    def nothing(question: str) -> None:
        question.upper()

    for fn in (stub, alias, newtype, hashable):
        assert none_is_wrong(fn) is None, fn.__name__
        assert SequentialPipeline([stage(fn, writes=["answer"])])(question="q").answer is None
    assert none_is_wrong(nothing) == "it has no `return <value>` statement"  # (`-> None`: gives nothing)


def test_a_stage_around_a_function_is_held_alone_and_in_a_pipeline(mode: str) -> None:
    class Sub(stageflow.Stage):
        def forward(self, **kw: Any) -> Any:
            return super().forward(**kw)

    for s in (
        stageflow.Stage(_forgot, writes=["answer"]),
        stageflow.Stage(_forgot, writes=["answer"], retry=2),
        stageflow.Stage(stageflow.Stage(_forgot, writes=["answer"])),
        Sub(stage(_forgot, writes=["answer"])),
    ):
        with pytest.raises(StageError, match="returned None for its output 'answer'"):
            asyncio.run(call(s, mode, question="q"))
        with pytest.raises(StageError, match="returned None for its output 'answer'"):
            asyncio.run(call(SequentialPipeline([s]), mode, question="q"))


def test_a_generator_function_is_not_read_as_returning_nothing() -> None:
    def gen(question: str):  # type: ignore[no-untyped-def]
        yield question

    assert none_is_wrong(gen) is None
