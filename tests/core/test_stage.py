"""Stages: renaming, reads/writes, function stages, return annotations, single values, bad renames."""

from __future__ import annotations

from typing import Any, TypedDict

import dspy
import pytest
from pydantic import BaseModel

from stageflow import (
    ConfigurationError,
    FunctionStage,
    Ports,
    SequentialPipeline,
    Stage,
    describe,
    stage,
)
from stageflow.testing import FakeLM, call


class Stats(TypedDict):
    length: int
    upper: str


class Words(BaseModel):
    words: list[str]
    first: str


# -- renaming ------------------------------------------------------------------------------


def test_stage_ports_are_renamed() -> None:
    s = Stage(
        dspy.Predict("context, question -> answer"),
        inputs={"context": "passages"},
        outputs={"answer": "draft"},
    )
    assert s.ports.required == ("passages", "question")
    assert s.ports.outputs == ("draft",)


async def test_renamed_predict_reads_and_writes_state_names(mode: str) -> None:
    lm = FakeLM({"answer": lambda i: "A(" + i["question"] + ")"})
    p = SequentialPipeline(
        [
            Stage(
                dspy.Predict("question -> answer"), inputs={"question": "query"}, outputs={"answer": "draft"}
            ),
        ]
    )
    with dspy.context(lm=lm):
        result = await call(p, mode, query="hello")
    assert result.toDict() == {"query": "hello", "draft": "A(hello)"}
    # The predictor itself saw its own field name.
    assert lm.log == [(("answer",), {"question": "hello"})]


async def test_renamed_function_stage(mode: str) -> None:
    def shout(text: str) -> dict[str, Any]:
        return {"out": text.upper()}

    p = SequentialPipeline(
        [Stage(stage(shout, writes=["out"]), inputs={"text": "msg"}, outputs={"out": "loud"})]
    )
    result = await call(p, mode, msg="hi")
    assert result.toDict() == {"msg": "hi", "loud": "HI"}


def test_stage_called_directly_applies_renames() -> None:
    lm = FakeLM({"answer": lambda i: i["question"] + "!"})
    s = Stage(dspy.Predict("question -> answer"), inputs={"question": "q"}, outputs={"answer": "a"})
    with dspy.context(lm=lm):
        out = s(q="x")
    assert out.toDict() == {"a": "x!"}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"inputs": {"qestion": "query"}}, "qestion"),
        ({"outputs": {"answr": "draft"}}, "answr"),
    ],
)
def test_bad_rename_is_configuration_error_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as ei:
        Stage(dspy.Predict("question -> answer"), **kwargs)
    err = ei.value
    assert err.code == "bad_rename"
    assert err.field == field
    assert repr(field) in str(err)
    assert "Fix:" in str(err)


def test_bad_rename_of_function_stage_output() -> None:
    with pytest.raises(ConfigurationError) as ei:
        Stage(stage(lambda text: {"x": 1}, writes=["x"]), outputs={"y": "z"})
    assert ei.value.field == "y"
    assert ei.value.code == "bad_rename"


def test_stage_of_class_instead_of_instance_is_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as ei:
        Stage(dspy.Predict)
    assert ei.value.code == "not_a_stage"
    assert "instance" in str(ei.value)


# -- reads / writes ------------------------------------------------------------------------


class KwModule(dspy.Module):
    def forward(self, **kwargs: Any) -> dspy.Prediction:
        return dspy.Prediction(out=kwargs["a"] + 1, seen=sorted(kwargs))


def test_module_with_kwargs_has_unknown_ports_until_declared() -> None:
    assert describe(KwModule()) == Ports(accepts_any=True)
    s = Stage(KwModule(), reads=["a"], writes=["out", "seen"])
    assert s.ports.required == ("a",)
    assert s.ports.outputs == ("out", "seen")


async def test_reads_writes_on_module(mode: str) -> None:
    p = SequentialPipeline(
        [
            Stage(KwModule(), reads=["a"], writes=["out", "seen"]),
            stage(lambda out: {"final": out * 10}, writes=["final"]),
        ]
    )
    result = await call(p, mode, a=1, b=2)
    assert result.out == 2
    assert result.seen == ["a"]
    assert result.final == 20


def test_reads_as_string_is_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as ei:
        stage(lambda text: text, reads="text")
    assert ei.value.code == "bad_declaration"


def test_reads_naming_unknown_parameter_is_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as ei:
        stage(lambda text: text, reads=["txt"])
    assert ei.value.code == "bad_declaration"
    assert ei.value.field == "txt"


# -- function stages -----------------------------------------------------------------------


def test_decorator_with_arguments_and_plain_call_are_the_same() -> None:
    @stage(writes=["shout"])
    def upper(text: str) -> dict[str, str]:
        return {"shout": text.upper()}

    def lower(text: str) -> dict[str, str]:
        return {"quiet": text.lower()}

    plain = stage(lower, writes=["quiet"])
    assert isinstance(upper, FunctionStage)
    assert isinstance(plain, FunctionStage)
    assert upper.ports.required == ("text",)
    assert upper.ports.outputs == ("shout",)
    assert plain.ports.outputs == ("quiet",)
    assert upper.stage_name == "upper"
    assert repr(plain) == "FunctionStage(lower)"
    assert upper(text="a") == {"shout": "A"}
    result = SequentialPipeline([upper, plain])(text="MiXed")
    assert (result.shout, result.quiet) == ("MIXED", "mixed")


def test_bare_decorator_without_arguments() -> None:
    @stage
    def count(text: str, sep: str = " ") -> dict[str, int]:
        return {"n": len(text.split(sep))}

    assert count.ports.required == ("text",)
    assert count.ports.optional == ("sep",)
    assert count.ports.outputs is None


async def test_plain_function_in_pipeline_is_wrapped(mode: str) -> None:
    def words(text: str) -> Words:
        parts = text.split()
        return Words(words=parts, first=parts[0])

    p = SequentialPipeline([words])
    assert isinstance(p.stages[0], FunctionStage)
    result = await call(p, mode, text="a b c")
    assert result.words == ["a", "b", "c"]
    assert result.first == "a"


async def test_optional_parameters_get_state_value_or_default(mode: str) -> None:
    def join(text: str, sep: str = "-") -> dict[str, str]:
        return {"joined": sep.join(text.split())}

    p = SequentialPipeline([stage(join, writes=["joined"])])
    assert (await call(p, mode, text="a b")).joined == "a-b"
    assert (await call(p, mode, text="a b", sep="+")).joined == "a+b"


def test_typed_dict_return_annotation_declares_outputs() -> None:
    def stats(text: str) -> Stats:
        return {"length": len(text), "upper": text.upper()}

    ports = describe(stage(stats))
    assert ports.outputs == ("length", "upper")
    assert ports.types["length"] is int
    p = SequentialPipeline([stats, stage(lambda length, upper: {"msg": f"{upper}:{length}"}, writes=["msg"])])
    assert p.check(["text"]) == ("length", "msg", "text", "upper")
    assert p(text="ab").msg == "AB:2"


def test_pydantic_return_annotation_declares_outputs() -> None:
    def split(text: str) -> Words:
        parts = text.split()
        return Words(words=parts, first=parts[0])

    ports = describe(stage(split))
    assert ports.outputs == ("words", "first")
    assert ports.types["words"] == list[str]
    p = SequentialPipeline([split, stage(lambda first: {"initial": first[0]}, writes=["initial"])])
    result = p(text="hello world")
    assert result.words == ["hello", "world"]
    assert result.initial == "h"


async def test_single_value_with_one_write_is_stored_under_that_name(mode: str) -> None:
    p = SequentialPipeline(
        [
            stage(lambda text: len(text), writes=["length"]),
            stage(lambda length: [length] * 2, writes=["pair"]),
        ]
    )
    result = await call(p, mode, text="abcd")
    assert result.length == 4
    assert result.pair == [4, 4]


def test_single_write_with_mapping_return_takes_the_field() -> None:
    p = SequentialPipeline([stage(lambda text: {"length": len(text)}, writes=["length"])])
    assert p(text="abc").length == 3


async def test_async_function_stage_runs_natively_under_acall() -> None:
    async def fetch(text: str) -> Stats:
        return {"length": len(text), "upper": text.upper()}

    p = SequentialPipeline(
        [Stage(stage(fetch), outputs={"length": "n"}), stage(lambda n: n * 3, writes=["t"])]
    )
    result = await p.acall(text="xy")
    assert result.toDict() == {"text": "xy", "n": 2, "upper": "XY", "t": 6}


def test_async_function_stage_in_a_sync_call_runs_on_the_background_loop() -> None:
    async def fetch(text: str) -> Stats:
        return {"length": len(text), "upper": text.upper()}

    result = SequentialPipeline([fetch])(text="xy")
    assert (result.length, result.upper) == (2, "XY")


def test_describe_predict_and_chain_of_thought() -> None:
    ports = describe(dspy.Predict("question, context -> answer"))
    assert ports.required == ("question", "context")
    assert ports.outputs == ("answer",)
    cot = describe(dspy.ChainOfThought("question -> answer"))
    assert cot.required == ("question",)
    assert cot.outputs == ("reasoning", "answer")


def test_describe_module_from_forward_signature() -> None:
    class M(dspy.Module):
        def forward(self, question: str, k: int = 3) -> dspy.Prediction:
            return dspy.Prediction(answer=question * k)

    ports = describe(M())
    assert ports.required == ("question",)
    assert ports.optional == ("k",)
    assert ports.outputs is None


def test_describe_non_stage_is_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as ei:
        describe(42)
    assert ei.value.code == "not_a_stage"


async def test_chain_of_thought_stage_writes_reasoning(mode: str) -> None:
    lm = FakeLM({"reasoning": "because", "answer": "42"})
    p = SequentialPipeline([dspy.ChainOfThought("question -> answer")])
    with dspy.context(lm=lm):
        result = await call(p, mode, question="?")
    assert result.reasoning == "because"
    assert result.answer == "42"


async def test_custom_module_without_aforward_runs_under_acall(mode: str) -> None:
    class Exclaim(dspy.Module):
        def forward(self, question: str) -> dspy.Prediction:
            return dspy.Prediction(answer=question + "!")

    p = SequentialPipeline([Stage(Exclaim(), writes=["answer"])])
    result = await call(p, mode, question="hi")
    assert result.answer == "hi!"
