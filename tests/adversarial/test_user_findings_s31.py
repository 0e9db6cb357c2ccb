"""Findings of a user-style run of the tutorial and README (helper 88), each the reproducer of one.

- a function stage or ``Stage`` called with positional arguments said ``FunctionStage.forward()
  takes 1 positional argument but 2 were given``; now it says to pass its inputs by name, naming
  them, as a pipeline does;
- an error of a ``Stage`` subclass's own ``__call__`` was blamed on the function it wraps;
- ``"stage_0" in result.trace`` was ``False`` although ``result.trace["stage_0"]`` worked;
- a forgotten ``return`` in a stage that declares nothing was explained with an unrelated field
  name (``writes=['answer']``);
- redaction turned DSPy's fix hint ``api_key="..."`` / ``(api_key= on dspy.LM)`` into
  ``api_key=[REDACTED]`` / ``(api_key= [REDACTED] dspy.LM)``; real values are still redacted;
- a ForEach item's origin was quoted inside quotes (``'ForEach item of 'words''``).
"""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ConfigurationError, ContractError, SequentialPipeline, StageError
from stageflow.observe.redact import redact_text
from stageflow.testing import FakeLM, call


@stageflow.stage(writes=["greeting"])
def greet(name: str) -> dict[str, str]:
    return {"greeting": "hi " + name}


def test_positional_arguments_to_a_function_stage_are_explained(mode: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        asyncio.run(call(greet, mode, "Ada"))
    assert info.value.code == "positional_args"
    assert "stage 'greet' takes keyword arguments only" in str(info.value)
    assert "greet(name=...)" in str(info.value)
    assert asyncio.run(call(greet, mode, name="Ada")) == {"greeting": "hi Ada"}


def test_positional_arguments_to_a_stage_are_explained(mode: str) -> None:
    with pytest.raises(ConfigurationError, match=r"Stage\(Predict\(q -> a\)\) takes keyword arguments only"):
        asyncio.run(call(stageflow.Stage(dspy.Predict("q -> a")), mode, "x"))


class Forgets(stageflow.Stage):
    def __init__(self) -> None:
        super().__init__(stageflow.stage(lambda answer: {"loud": answer}, writes=["loud"]))

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return {"lod": kw["answer"]}


def test_an_error_of_a_subclass_own_call_names_the_subclass(mode: str) -> None:
    p = SequentialPipeline([dspy.Predict("question -> answer"), Forgets()])
    with dspy.context(lm=FakeLM({"answer": "a"})), pytest.raises(ContractError) as info:
        asyncio.run(call(p, mode, question="x"))
    assert "Stage 'stages[1]' (Forgets) declares output 'loud'" in str(info.value)
    assert "lambda" not in str(info.value)


def test_the_tutorial_names_are_in_the_trace_and_the_stage_outputs(mode: str) -> None:
    p = SequentialPipeline([dspy.Predict("question -> draft"), dspy.Predict("draft -> answer")])
    with dspy.context(lm=FakeLM({"draft": "d", "answer": "a"})):
        r = asyncio.run(call(p, mode, question="q"))
    for name in p.stage_names:
        assert name in r.trace
        assert name in r.stage_outputs
    assert "stage_9" not in r.trace
    assert r.trace[0] in r.trace  # (records still are)


def test_a_forgotten_return_without_declarations_says_so(mode: str) -> None:
    def tokenize(text: str):  # type: ignore[no-untyped-def]
        text.split()

    with pytest.raises(StageError) as info:
        asyncio.run(call(SequentialPipeline([tokenize]), mode, text="a b"))
    assert "returned None (a forgotten `return`?)" in str(info.value)
    assert "'answer'" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "kept"),
    [
        ('or pass api_key="..." to dspy.LM(...)', 'api_key="..."'),
        ("Pass the key explicitly (api_key= on dspy.LM)", "(api_key= on dspy.LM)"),
        ("set OPENAI_API_KEY=... in the environment", "OPENAI_API_KEY=..."),
        ("token=<your token>", "token=<your token>"),
    ],
)
def test_placeholders_in_a_fix_hint_stay_readable(text: str, kept: str) -> None:
    assert kept in redact_text(text)


@pytest.mark.parametrize(
    "text",
    ['api_key = "abc123"', "api_key=abc123", "password: hunter2", '"api_key": "xyz"', 'api_key="...secret"'],
)
def test_values_are_still_redacted(text: str) -> None:
    out = redact_text(text)
    assert "[REDACTED]" in out
    assert not any(v in out for v in ("abc123", "hunter2", "xyz", 'secret"'))


def test_a_foreach_item_origin_is_not_quoted_twice() -> None:
    shout = stageflow.stage(lambda word: {"loud": word.upper()}, writes=["loud"])
    after = stageflow.stage(lambda loud, missing: {"x": 1}, writes=["x"])
    fe = stageflow.ForEach(SequentialPipeline([shout, after]), over="words", item="word", collect={"x": "xs"})
    with pytest.raises(ContractError) as info:
        fe(words=["a"])
    assert "needs input 'missing'" in str(info.value)
    assert "'word' from 'ForEach over words'" in str(info.value)
