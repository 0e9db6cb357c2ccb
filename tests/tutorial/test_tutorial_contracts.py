"""Tutorial "Design Principles" §1 "Clear Interface Contracts": ``StageInput``, ``StageOutput``,
``StandardStage``.

The tutorial's models: ``StageInput(content: str, metadata: dict | None = None, context: str | None =
None)`` and ``StageOutput(content: str, confidence: float, metadata: dict | None = None, error: str |
None = None)``. A ``StandardStage`` subclass sets ``input_schema`` / ``output_schema`` and implements
``process(input_data) -> dict``; ``forward(**kwargs)`` validates the input, runs ``process``,
validates the output, and turns an exception inside ``process`` into
``StageOutput(content="", confidence=0.0, error=str(e))``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional  # noqa: UP035 (the tutorial's annotations, as written)

import dspy
import pytest
from pydantic import Field, ValidationError

from stageflow import ContractError, SequentialPipeline, StageInput, StageOutput, StandardStage
from stageflow.testing import FakeLM, call


# User code: StandardStage subclasses, as the tutorial has readers write them.
class Summarizer(StandardStage):
    def __init__(self):
        super().__init__()
        self.summarize = dspy.Predict("content -> summary")

    def process(self, input_data: StageInput) -> Dict[str, Any]:  # noqa: UP006 (the tutorial, as written)
        summary = self.summarize(content=input_data.content).summary
        return {"content": summary, "confidence": 0.9, "metadata": {"words": len(input_data.content.split())}}


class Shout(StandardStage):
    def process(self, input_data: StageInput) -> Dict[str, Any]:  # noqa: UP006 (the tutorial, as written)
        return {"content": input_data.content.upper(), "confidence": 1.0}


class Fragile(StandardStage):
    def process(self, input_data: StageInput) -> Dict[str, Any]:  # noqa: UP006 (the tutorial, as written)
        raise ValueError("the knowledge base is offline")


class TranslationInput(StageInput):
    target_language: str = Field(default="fr", description="Language to translate into")


class TranslationOutput(StageOutput):
    language: Optional[str] = Field(default=None, description="Language of the content")  # noqa: UP045


class Translator(StandardStage):
    input_schema = TranslationInput
    output_schema = TranslationOutput

    def process(self, input_data: TranslationInput) -> Dict[str, Any]:  # noqa: UP006 (the tutorial, as written)
        return {
            "content": f"[{input_data.target_language}] {input_data.content}",
            "confidence": 0.7,
            "language": input_data.target_language,
        }


def summary_lm() -> FakeLM:
    return FakeLM({"summary": lambda i: "summary: " + i["content"][:12]})


def test_the_models_have_the_tutorials_fields() -> None:
    given = StageInput(content="text", metadata={"source": "web"}, context="a note")
    assert (given.content, given.metadata, given.context) == ("text", {"source": "web"}, "a note")
    bare = StageInput(content="text")
    assert (bare.metadata, bare.context) == (None, None)
    with pytest.raises(ValidationError):
        StageInput()  # content is required
    out = StageOutput(content="done", confidence=0.8)
    assert (out.content, out.confidence, out.metadata, out.error) == ("done", 0.8, None, None)


async def test_a_standard_stage_validates_processes_and_returns_the_output(mode: str) -> None:
    lm = summary_lm()
    with dspy.context(lm=lm):
        out = await call(Summarizer(), mode, content="Rivers carry water to the sea.", metadata={"id": 7})
    assert out.content == "summary: Rivers carry"
    assert out.confidence == 0.9
    assert out.metadata == {"words": 6}
    assert out.error is None


async def test_forward_returns_the_validated_output_model(mode: str) -> None:
    out = await call(Shout(), mode, content="quiet")
    assert isinstance(out, StageOutput)
    assert out.model_dump() == {"content": "QUIET", "confidence": 1.0, "metadata": None, "error": None}


async def test_an_exception_in_process_becomes_an_error_output(mode: str) -> None:
    out = await call(Fragile(), mode, content="anything")
    assert out.content == ""
    assert out.confidence == 0.0
    assert "the knowledge base is offline" in out.error


async def test_invalid_input_is_refused_before_process_runs(mode: str) -> None:
    with pytest.raises(ContractError) as info:
        await call(Shout(), mode, metadata={"id": 1})
    assert info.value.field == "content"


async def test_subclass_schemas_add_fields(mode: str) -> None:
    out = await call(Translator(), mode, content="hello", target_language="de")
    assert (out.content, out.language, out.confidence) == ("[de] hello", "de", 0.7)
    assert Translator.input_schema is TranslationInput
    assert Translator.output_schema is TranslationOutput


async def test_standard_stages_chain_on_content_in_a_pipeline(mode: str) -> None:
    pipeline = SequentialPipeline([Summarizer(), Shout()])
    with dspy.context(lm=summary_lm()):
        result = await call(pipeline, mode, content="Rivers carry water to the sea.")
    assert result.content == "SUMMARY: RIVERS CARRY"
    assert result.confidence == 1.0
