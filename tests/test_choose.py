"""stageflow.choose.Choose: constrained choice among upstream candidates, by generation or likelihood."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import dspy
import pytest
from dspy.lm15 import Message, Response, TokenLogprob, Usage

from stageflow.choose import Choose, clean_candidates, value_logprob
from stageflow.errors import ConfigurationError
from stageflow.testing import isolated_dspy


def allowed(request: Any) -> list[str]:
    """The answer values a request's JSON schema allows (``enum``, or ``const`` for one value)."""
    field = request.config.response_format["schema"]["properties"]["answer"]
    return list(field["enum"]) if "enum" in field else [field["const"]]


class EnumEngine:
    """A DSPy engine that answers with an allowed value (the schema's enum), scoring each value.

    ``prefer`` picks the value for a multi-value enum; ``scores`` gives each value's log-probability,
    reported (when asked) as three tokens: the JSON head, the value, the tail.
    """

    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = frozenset({"response_format", "temperature", "max_tokens", "logprobs"})

    def __init__(self, scores: dict[str, float], prefer: str | None = None, logprobs: bool = True) -> None:
        self.scores = scores
        self.prefer = prefer
        self.logprobs = logprobs
        self.requests: list[Any] = []

    def complete(self, request: Any) -> Response:
        self.requests.append(request)
        enum = allowed(request)
        value = self.prefer if self.prefer in enum else enum[0]
        text = json.dumps({"answer": value})
        tokens = None
        if request.config.logprobs is not None and self.logprobs:
            tokens = (
                TokenLogprob(token='{"answer": "', logprob=-0.5),
                TokenLogprob(token=value, logprob=self.scores[value]),
                TokenLogprob(token='"}', logprob=-0.25),
            )
        return Response(
            id="x",
            model=request.model,
            message=Message.assistant(text),
            finish_reason="stop",
            usage=Usage(input_tokens=1, output_tokens=1),
            logprobs=tokens,
        )

    def stream(self, request: Any) -> Any:
        yield from ()

    def close(self) -> None:
        pass


class AsyncEnumEngine:
    supports_response_schema = True
    supports_function_calling = False
    supports_reasoning = False
    supported_params = EnumEngine.supported_params

    def __init__(self, sync: EnumEngine) -> None:
        self.sync = sync

    async def complete(self, request: Any) -> Response:
        return self.sync.complete(request)

    async def stream(self, request: Any) -> Any:
        if False:
            yield None

    async def aclose(self) -> None:
        pass


def lm_for(engine: EnumEngine) -> dspy.LM:
    return dspy.LM("local/enum-fake", engine=engine, async_engine=AsyncEnumEngine(engine), cache=False)


SCORES = {"Lyon": -3.0, "Paris": -0.5, "Nice": -2.0}


@pytest.fixture(autouse=True)
def _isolated() -> Any:
    with isolated_dspy():
        yield


def test_generate_constrains_the_output_to_the_candidates() -> None:
    engine = EnumEngine(SCORES, prefer="Nice")
    pick = Choose("question, candidates -> answer")
    with dspy.context(lm=lm_for(engine), adapter=dspy.JSONAdapter()):
        result = pick(question="Capital of France?", candidates=["Lyon", "Paris", "Nice"])
    assert result.answer == "Nice"
    assert result.choice_scores == {"Lyon": None, "Paris": None, "Nice": 0.0}
    assert len(engine.requests) == 1
    assert allowed(engine.requests[0]) == ["Lyon", "Paris", "Nice"]
    assert "Lyon" in str(engine.requests[0].messages[-1])  # the model sees the list


def test_likelihood_forces_each_candidate_and_keeps_the_most_likely() -> None:
    engine = EnumEngine(SCORES)
    pick = Choose("question, candidates -> answer", scoring="likelihood")
    with dspy.context(lm=lm_for(engine), adapter=dspy.JSONAdapter()):
        result = pick(question="Capital of France?", candidates=["Lyon", "Paris", "Nice"])
    assert result.answer == "Paris"
    # the shared JSON head is left out; the value and the closing tokens count
    assert result.choice_scores == {"Lyon": -3.25, "Paris": -0.75, "Nice": -2.25}
    assert [allowed(r) for r in engine.requests] == [["Lyon"], ["Paris"], ["Nice"]]
    assert all(r.config.logprobs is not None for r in engine.requests)


def test_likelihood_without_logprobs_is_a_clear_error() -> None:
    pick = Choose("question, candidates -> answer", scoring="likelihood")
    with (
        dspy.context(lm=lm_for(EnumEngine(SCORES, logprobs=False)), adapter=dspy.JSONAdapter()),
        pytest.raises(ConfigurationError) as info,
    ):
        pick(question="Capital of France?", candidates=["Lyon", "Paris"])
    assert info.value.code == "no_logprobs"
    assert "scoring='generate'" in (info.value.hint or "")


def test_async_gives_the_same_choice() -> None:
    engine = EnumEngine(SCORES)
    pick = Choose("question, candidates -> answer", scoring="likelihood")

    async def run() -> Any:
        with dspy.context(lm=lm_for(engine), adapter=dspy.JSONAdapter()):
            return await pick.acall(question="Capital of France?", candidates=["Nice", "Paris"])

    result = asyncio.run(run())
    assert result.answer == "Paris"
    assert set(result.choice_scores) == {"Nice", "Paris"}


def test_no_candidates_means_no_call_and_an_empty_answer() -> None:
    engine = EnumEngine(SCORES)
    pick = Choose("question, candidates -> answer")
    with dspy.context(lm=lm_for(engine), adapter=dspy.JSONAdapter()):
        result = pick(question="?", candidates=[" ", None])
    assert result.answer == ""
    assert result.choice_scores == {}
    assert engine.requests == []


def test_one_candidate_is_generated_once_even_for_likelihood() -> None:
    engine = EnumEngine(SCORES)
    pick = Choose("question, candidates -> answer", scoring="likelihood")
    with dspy.context(lm=lm_for(engine), adapter=dspy.JSONAdapter()):
        assert pick(question="?", candidates=["Paris", "paris"]).answer == "Paris"
    assert len(engine.requests) == 1


def test_max_candidates_and_hidden_candidates() -> None:
    engine = EnumEngine(SCORES, prefer="Nice")
    pick = Choose("question, candidates -> answer", max_candidates=2, show_candidates=False)
    with dspy.context(lm=lm_for(engine), adapter=dspy.JSONAdapter()):
        result = pick(question="?", candidates=["Lyon", "Paris", "Nice"])
    assert result.answer == "Lyon"  # Nice was cut: only the first two are allowed
    assert allowed(engine.requests[0]) == ["Lyon", "Paris"]
    assert '["Lyon", "Paris"]' not in str(engine.requests[0].messages[-1])  # the input list is empty


def test_the_predictor_is_visible_to_optimizers_and_keeps_its_demos() -> None:
    pick = Choose("question, candidates -> answer")
    assert [name for name, _ in pick.named_predictors()] == ["predict"]
    pick.predict.demos = [dspy.Example(question="Capital of Peru?", candidates=["Lima"], answer="Lima")]
    engine = EnumEngine(SCORES, prefer="Paris")
    with dspy.context(lm=lm_for(engine), adapter=dspy.JSONAdapter()):
        pick(question="Capital of France?", candidates=["Lyon", "Paris"])
    assert "Capital of Peru?" in json.dumps([str(m) for m in engine.requests[0].messages])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"signature": "question -> answer, why"}, "signature"),
        ({"signature": "question -> answer", "scoring": "vibes"}, "scoring"),
        ({"signature": "question -> answer", "max_candidates": 0}, "max_candidates"),
    ],
)
def test_bad_settings(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Choose(**kwargs)
    assert info.value.field == field


def test_clean_candidates() -> None:
    assert clean_candidates("Paris") == ["Paris"]
    assert clean_candidates(None) == []
    assert clean_candidates(["a", "B", "b", 3], limit=2) == ["a", "B"]


def test_value_logprob_uses_bytes_and_handles_a_missing_value() -> None:
    content = [
        {"token": "{", "logprob": -1.0, "bytes": list(b"{")},
        {"token": '"x": "', "logprob": -1.0, "bytes": list(b'"x": "')},
        {"token": "Zürich", "logprob": -0.5, "bytes": list("Zürich".encode())},
        {"token": '"}', "logprob": -0.1, "bytes": list(b'"}')},
    ]
    assert value_logprob({"content": content}, "Zürich") == pytest.approx(-0.6)
    assert value_logprob({"content": content}, "Bern") == pytest.approx(-2.6)  # not found: all tokens
    with pytest.raises(ValueError):
        value_logprob({"content": []}, "x")
    with pytest.raises(ValueError):
        value_logprob(None, "x")


@pytest.mark.parametrize(("scoring", "answer"), [("generate", "Nice"), ("likelihood", "Paris")])
def test_inside_a_pipeline_the_constraint_still_reaches_the_lm(scoring: str, answer: str) -> None:
    from stageflow.patterns.sequential import SequentialPipeline
    from stageflow.stages import Stage

    engine = EnumEngine(SCORES, prefer="Nice")
    choose = Choose("question, candidates -> answer", scoring=scoring)  # type: ignore[arg-type]
    pipeline = SequentialPipeline(
        [Stage(choose, reads=["question", "candidates"], writes=["answer", "choice_scores"])]
    )
    with dspy.context(lm=lm_for(engine), adapter=dspy.JSONAdapter()):
        result = pipeline(question="Capital of France?", candidates=["Lyon", "Paris", "Nice"])
    assert result.answer == answer
    assert set(result.choice_scores) == {"Lyon", "Paris", "Nice"}
    expected = [["Lyon", "Paris", "Nice"]] if scoring == "generate" else [["Lyon"], ["Paris"], ["Nice"]]
    assert [allowed(r) for r in engine.requests] == expected


def test_doctests() -> None:
    import doctest

    import stageflow.choose

    result = doctest.testmod(stageflow.choose)
    assert result.attempted > 0
    assert result.failed == 0
