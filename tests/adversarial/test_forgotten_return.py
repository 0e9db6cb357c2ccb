"""A function stage with one declared output that forgot its ``return`` fails loudly.

Before: ``@stage(writes=["answer"])`` around a function with no ``return <value>`` wrote ``None`` as
the answer, in a pipeline and called alone (a silent wrong result). Now that ``None`` is a
``StageError`` (code ``bad_output``) naming the stage and the field, when the function cannot mean
it: it has no ``return <value>`` at all, or its return annotation leaves ``None`` out. A function
that may return ``None`` (``-> str | None``, or an unannotated one with a ``return <value>``
elsewhere) still writes it, and so does ``return {"answer": None}``.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Optional

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
    return question.upper() if question else None  # type: ignore[return-value]


def _optional(question: str) -> str | None:
    return question.upper() if question else None


def _old_optional(question: str) -> Optional[str]:  # noqa: UP045
    return question.upper() if question else None


def _unannotated(question: str):  # type: ignore[no-untyped-def]
    if question:
        return question.upper()
    return None


@pytest.mark.parametrize("fn", [_forgot, _aforgot, _typed], ids=["no-return", "async-no-return", "annotated"])
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


@pytest.mark.parametrize("fn", [_forgot, _aforgot, _typed], ids=["no-return", "async-no-return", "annotated"])
def test_a_forgotten_return_called_alone_is_refused(fn: Any, mode: str) -> None:
    s = stage(fn, writes=["answer"])
    with pytest.raises(StageError, match="returned None for its output 'answer'") as info:
        asyncio.run(call(s, mode, question=""))
    assert info.value.field == "answer"


def test_the_error_says_why_none_cannot_be_meant() -> None:
    p = SequentialPipeline([stage(_typed, writes=["answer"], name="shout")])
    with pytest.raises(StageError, match="annotated to return 'str'") as info:
        p(question="")
    assert "| None" in str(info.value)
    with pytest.raises(StageError, match="no `return <value>` statement") as info:
        SequentialPipeline([stage(_forgot, writes=["answer"])])(question="q")
    assert "| None" not in str(info.value)  # (no annotation can make such a function return a value)


@pytest.mark.parametrize(
    "fn", [_optional, _old_optional, _unannotated], ids=["union", "Optional", "unannotated"]
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


def test_wrappers_partials_and_callable_objects_are_read_through() -> None:
    def deco(f: Any) -> Any:
        @functools.wraps(f)
        def inner(*a: Any, **k: Any) -> Any:
            return f(*a, **k)

        return inner

    class Callable:
        def __call__(self, question: str) -> None:
            question.upper()

    assert none_is_wrong(deco(_forgot)) == "it has no `return <value>` statement"
    assert none_is_wrong(functools.partial(_forgot)) == "it has no `return <value>` statement"
    assert none_is_wrong(Callable()) == "it has no `return <value>` statement"
    assert none_is_wrong(print) is None  # (no code to read: cannot be told)
    assert none_is_wrong(lambda q: q or None) is None
    assert none_is_wrong(lambda q: None) is None  # (a lambda says what it returns)
    # A return shared by two branches (the compiler merges `return x if c else None`) returns a value.
    assert none_is_wrong(_optional) is None


def test_a_generator_function_is_not_read_as_returning_nothing() -> None:
    def gen(question: str):  # type: ignore[no-untyped-def]
        yield question

    assert none_is_wrong(gen) is None
