"""StandardStage: pydantic contracts, error outputs, async process, use inside pipelines."""

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
    SequentialPipeline,
    StageInput,
    StageOutput,
    StandardStage,
    describe,
    stage,
)
from stageflow.testing import call


class TextIn(StageInput):
    text: str
    times: int = 1


class LengthOut(StageOutput):
    length: int | None = None


class StrictOut(StageOutput):
    length: int


class Measure(StandardStage):
    input_model, output_model = TextIn, LengthOut

    def process(self, data: TextIn) -> LengthOut:
        return LengthOut(length=len(data.text) * data.times)


class Broken(StandardStage):
    input_model, output_model = TextIn, StrictOut

    def process(self, data: TextIn) -> StrictOut:
        raise ValueError("kaput")


class AsyncMeasure(StandardStage):
    input_model, output_model = TextIn, LengthOut

    async def process(self, data: TextIn) -> dict[str, Any]:
        await asyncio.sleep(0)
        return {"length": len(data.text) + 100, "confidence": 0.5}


async def test_valid_input_produces_output_fields(mode: str) -> None:
    out = await call(Measure(), mode, text="hello", times=2)
    assert out.toDict() == {"error": None, "confidence": 1.0, "length": 10}


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ({"text": None}, "text"),
        ({"text": 5}, "text"),
        ({"text": "a", "times": "many"}, "times"),
        ({}, "text"),
        ({"text": "a", "extra": 1}, "extra"),
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
    assert "Expected fields: ['text', 'times']" in str(err)
    assert err.__cause__ is not None


async def test_exception_in_process_becomes_error_output(mode: str) -> None:
    out = await call(Broken(), mode, text="x")
    assert out.error == "ValueError: kaput"
    assert out.confidence == 0.0
    assert out.length is None


async def test_async_process() -> None:
    out = await AsyncMeasure().acall(text="abc")
    assert out.length == 103
    assert out.confidence == 0.5
    assert out.error is None


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_async_process_called_sync_is_configuration_error() -> None:
    with pytest.raises(ConfigurationError) as ei:
        AsyncMeasure()(text="abc")
    assert ei.value.code == "async_process"
    assert "acall" in str(ei.value)
    del ei
    gc.collect()


def test_async_process_called_sync_does_not_leak_a_coroutine() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with contextlib.suppress(ConfigurationError):
            AsyncMeasure()(text="abc")
        gc.collect()
    leaked = [
        w for w in caught if issubclass(w.category, RuntimeWarning) and "never awaited" in str(w.message)
    ]
    assert leaked == []


class BadDict(StandardStage):
    input_model, output_model = TextIn, LengthOut

    def process(self, data: TextIn) -> dict[str, Any]:
        return {"length": "not a number"}


class BadType(StandardStage):
    input_model, output_model = TextIn, LengthOut

    def process(self, data: TextIn) -> int:
        return 5


async def test_invalid_output_is_contract_error(mode: str) -> None:
    with pytest.raises(ContractError) as ei:
        await call(BadDict(), mode, text="x")
    assert ei.value.field == "length"
    assert ei.value.code == "invalid_output"
    with pytest.raises(ContractError) as ei:
        await call(BadType(), mode, text="x")
    assert ei.value.code == "invalid_output"
    assert "returned int" in str(ei.value)


def test_models_passed_to_init() -> None:
    class Generic(StandardStage):
        def process(self, data: Any) -> Any:
            return {"length": len(data.text)}

    s = Generic(TextIn, LengthOut)
    assert s(text="abcd").length == 4


def test_bad_models_are_configuration_errors() -> None:
    class NotModels(StandardStage):
        input_model = int  # type: ignore[assignment]

    with pytest.raises(ConfigurationError) as ei:
        NotModels()
    assert ei.value.field == "input_model"
    assert ei.value.code == "bad_contract"

    with pytest.raises(ConfigurationError) as ei:
        StandardStage(TextIn, TextIn)  # type: ignore[arg-type]
    assert ei.value.field == "output_model"


def test_ports_come_from_pydantic_models() -> None:
    ports = describe(Measure())
    assert ports.required == ("text",)
    assert ports.optional == ("times",)
    assert ports.outputs == ("error", "confidence", "length")
    assert ports.types["text"] is str


async def test_inside_sequential_pipeline(mode: str) -> None:
    p = SequentialPipeline([Measure(), stage(lambda length: length * 2, writes=["double"])])
    assert p.check(["text"]) == ("confidence", "double", "error", "length", "text")
    result = await call(p, mode, text="abcd")
    assert result.length == 4
    assert result.double == 8
    assert result.confidence == 1.0
    with_opt = await call(p, mode, text="abcd", times=3)
    assert with_opt.double == 24


async def test_async_standard_stage_inside_pipeline() -> None:
    p = SequentialPipeline([AsyncMeasure(), stage(lambda length: length + 1, writes=["plus"])])
    result = await p.acall(text="a")
    assert result.plus == 102


async def test_missing_required_field_in_pipeline_is_caught_by_check(mode: str) -> None:
    p = SequentialPipeline([Measure()])
    with pytest.raises(ContractError) as ei:
        await call(p, mode, txt="a")
    assert ei.value.code == "missing_input"
    assert ei.value.field == "text"
    assert ei.value.stage_path == "stages[0]"


async def test_wrong_type_in_pipeline_is_contract_error_with_path(mode: str) -> None:
    p = SequentialPipeline([stage(lambda raw: {"text": len(raw)}, writes=["text"]), Measure()])
    with pytest.raises(ContractError) as ei:
        await call(p, mode, raw="abc")
    assert ei.value.code == "invalid_input"
    assert ei.value.field == "text"
    assert ei.value.stage_path == "stages[1]"


async def test_error_output_flows_through_pipeline(mode: str) -> None:
    p = SequentialPipeline(
        [Broken(), stage(lambda error, confidence: f"{confidence}:{error}", writes=["report"])]
    )
    result = await call(p, mode, text="x")
    assert result.report == "0.0:ValueError: kaput"
