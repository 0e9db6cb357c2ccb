"""StandardStage: the tutorial's schemas, error outputs, async process, use inside pipelines."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from typing import Any

import pytest

from stageflow import (
    ConfigurationError,
    ContractError,
    ErrorHandlingPipeline,
    SequentialPipeline,
    StageError,
    StageInput,
    StageOutput,
    StandardStage,
    describe,
    stage,
)
from stageflow.testing import call


class TimesIn(StageInput):
    times: int = 1


class LengthOut(StageOutput):
    length: int | None = None


class StrictOut(StageOutput):
    length: int


class Measure(StandardStage):
    input_schema, output_schema = TimesIn, LengthOut

    def process(self, input_data: TimesIn) -> dict[str, Any]:
        n = len(input_data.content) * input_data.times
        return {"content": input_data.content, "confidence": 1.0, "length": n}


class Broken(StandardStage):
    input_schema, output_schema = TimesIn, StrictOut

    def process(self, input_data: TimesIn) -> dict[str, Any]:
        raise ValueError("kaput")


class AsyncMeasure(StandardStage):
    input_schema, output_schema = TimesIn, LengthOut

    async def process(self, input_data: TimesIn) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"content": "async", "length": len(input_data.content) + 100, "confidence": 0.5}


def test_the_tutorials_standard_shapes() -> None:
    assert list(StageInput.model_fields) == ["content", "metadata", "context"]
    assert list(StageOutput.model_fields) == ["content", "confidence", "metadata", "error"]
    assert StageInput(content="x").metadata is None
    with pytest.raises(Exception, match="confidence"):
        StageOutput(content="x")  # confidence is required, as in the tutorial


async def test_valid_input_produces_the_validated_output_model(mode: str) -> None:
    out = await call(Measure(), mode, content="hello", times=2)
    assert isinstance(out, LengthOut)
    assert out.model_dump() == {
        "content": "hello",
        "confidence": 1.0,
        "metadata": None,
        "error": None,
        "length": 10,
    }


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"content": None}, "content"),
        ({"content": 5}, "content"),
        ({"content": "a", "times": "many"}, "times"),
        ({}, "content"),
        ({"content": "a", "extra": 1}, "extra"),
    ],
)
async def test_validation_error_is_contract_error_naming_field(
    mode: str, inputs: dict[str, Any], field: str
) -> None:
    with pytest.raises(ContractError) as ei:
        await call(Measure(), mode, **inputs)
    err = ei.value
    assert err.field == field
    assert err.code == "invalid_input"
    assert f"input field '{field}' is invalid" in str(err)
    assert "Expected fields: ['content', 'metadata', 'context', 'times']" in str(err)
    assert err.__cause__ is not None


async def test_exception_in_process_becomes_an_error_output(mode: str) -> None:
    out = await call(Broken(), mode, content="x")
    assert out.error == "ValueError: kaput"
    assert out.confidence == 0.0
    assert out.content == ""
    assert out.length is None  # a required field of the schema the failed stage could not fill


async def test_async_process() -> None:
    out = await AsyncMeasure().acall(content="abc")
    assert out.length == 103
    assert out.confidence == 0.5
    assert out.error is None


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_async_process_called_sync_is_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as ei:
        AsyncMeasure()(content="abc")
    assert ei.value.code == "async_process"
    assert "acall" in str(ei.value)
    del ei
    gc.collect()


def test_async_process_called_sync_does_not_leak_a_coroutine() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.suppress(ConfigurationError):
            AsyncMeasure()(content="abc")
        gc.collect()
    leaked = [
        w for w in caught if issubclass(w.category, RuntimeWarning) and "never awaited" in str(w.message)
    ]
    assert leaked == []


class BadDict(StandardStage):
    input_schema, output_schema = TimesIn, LengthOut

    def process(self, input_data: TimesIn) -> dict[str, Any]:
        return {"content": "x", "confidence": 1.0, "length": "not a number"}


class BadType(StandardStage):
    input_schema, output_schema = TimesIn, LengthOut

    def process(self, input_data: TimesIn) -> int:
        return 5


async def test_an_output_breaking_the_schema_is_an_error_output_naming_the_field(mode: str) -> None:
    out = await call(BadDict(), mode, content="x")
    assert out.error.startswith("ValueError: output field 'length' is invalid: Input should be a valid int")
    assert (out.content, out.confidence) == ("", 0.0)
    out = await call(BadType(), mode, content="x")
    assert "process returned int" in out.error


async def test_a_failed_standard_stage_fails_a_pipeline_naming_it(mode: str) -> None:
    p = SequentialPipeline([Broken(), stage(lambda content: content.upper(), writes=["shout"])])
    with pytest.raises(StageError) as ei:
        await call(p, mode, content="x")
    assert ei.value.stage_path == "stages[0]"
    assert ei.value.code == "stage_reported_error"
    assert "ValueError: kaput" in str(ei.value)


async def test_an_invalid_output_in_a_pipeline_is_a_repairable_contract_error(mode: str) -> None:
    p = SequentialPipeline([BadDict()])
    with pytest.raises(ContractError) as ei:
        await call(p, mode, content="x")
    assert ei.value.code == "invalid_output"
    assert ei.value.stage_path == "stages[0]"


async def test_error_handling_pipeline_recovers_a_failed_standard_stage(mode: str) -> None:
    p = ErrorHandlingPipeline(
        [Broken(), stage(lambda content: content.upper(), writes=["shout"])],
        recovery_strategies={0: lambda error, state: {**state, "content": "fallback"}},
    )
    result = await call(p, mode, content="x")
    assert result.shout == "FALLBACK"
    assert [(e["stage_index"], e["action"]) for e in result.error_log] == [(0, "recovered")]
    assert "kaput" in result.error_log[0]["error"]


def test_schemas_passed_to_init_and_the_model_aliases() -> None:
    class Generic(StandardStage):
        def process(self, input_data: Any) -> Any:
            return {"content": "", "confidence": 1.0, "length": len(input_data.content)}

    assert Generic(TimesIn, LengthOut)(content="abcd").length == 4
    assert Generic(input_model=TimesIn, output_model=LengthOut)(content="abc").length == 3

    class OldNames(StandardStage):
        input_model, output_model = TimesIn, LengthOut

        def process(self, input_data: Any) -> Any:
            return {"content": "", "confidence": 1.0, "length": input_data.times}

    assert OldNames.input_schema is TimesIn
    assert OldNames.output_schema is LengthOut
    assert Measure.input_model is TimesIn  # one concept, two names
    assert OldNames()(content="a", times=7).length == 7


def test_bad_schemas_are_configuration_errors() -> None:
    class NotModels(StandardStage):
        input_schema = int  # type: ignore[assignment]

    with pytest.raises(ConfigurationError) as ei:
        NotModels()
    assert ei.value.field == "input_schema"
    assert ei.value.code == "bad_contract"
    with pytest.raises(ConfigurationError) as ei:
        StandardStage(TimesIn, int)  # type: ignore[arg-type]
    assert ei.value.field == "output_schema"


def test_ports_come_from_the_schemas() -> None:
    ports = describe(Measure())
    assert ports.required == ("content",)
    assert ports.optional == ("metadata", "context", "times")
    assert ports.outputs == ("content", "confidence", "metadata", "error", "length")
    assert ports.types["content"] is str


async def test_inside_sequential_pipeline(mode: str) -> None:
    p = SequentialPipeline([Measure(), stage(lambda length: length * 2, writes=["double"])])
    assert p.check(["content"]) == ("confidence", "content", "double", "error", "length", "metadata")
    result = await call(p, mode, content="abcd")
    assert (result.length, result.double, result.confidence) == (4, 8, 1.0)
    with_opt = await call(p, mode, content="abcd", times=3)
    assert with_opt.double == 24


async def test_async_standard_stage_inside_pipeline() -> None:
    p = SequentialPipeline([AsyncMeasure(), stage(lambda length: length + 1, writes=["plus"])])
    result = await p.acall(content="a")
    assert result.plus == 102


async def test_standard_stages_chain_on_content(mode: str) -> None:
    class Upper(StandardStage):
        def process(self, input_data: StageInput) -> dict[str, Any]:
            return {"content": input_data.content.upper(), "confidence": 0.9}

    class Exclaim(StandardStage):
        def process(self, input_data: StageInput) -> StageOutput:
            return StageOutput(content=input_data.content + "!", confidence=0.8)

    result = await call(SequentialPipeline([Upper(), Exclaim()]), mode, content="hi")
    assert (result.content, result.confidence) == ("HI!", 0.8)


async def test_missing_required_field_in_pipeline_is_caught_by_check(mode: str) -> None:
    p = SequentialPipeline([Measure()])
    with pytest.raises(ContractError) as ei:
        await call(p, mode, txt="a")
    assert ei.value.code == "missing_input"
    assert ei.value.field == "content"
    assert ei.value.stage_path == "stages[0]"


async def test_wrong_type_in_pipeline_is_contract_error_with_path(mode: str) -> None:
    p = SequentialPipeline([stage(lambda raw: {"content": len(raw)}, writes=["content"]), Measure()])
    with pytest.raises(ContractError) as ei:
        await call(p, mode, raw="abc")
    assert ei.value.code == "invalid_input"
    assert ei.value.field == "content"
    assert ei.value.stage_path == "stages[1]"
