"""The prefix cache and logprobs on the real embedded model (SmolLM2-135M on llama.cpp).

Mechanics only: byte-identical outputs with and without the cache, snapshots really restored,
logprobs that spell the output. About 15 s on a 2-core machine.
"""

from __future__ import annotations

from typing import Any

import dspy
import pytest
from dspy.lm15 import Config, Message, Request

from stageflow.lm.engine import LlamaCppEngine

pytestmark = pytest.mark.integration

SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}},
    "required": ["answer"],
    "additionalProperties": False,
}
DEMOS = {
    "geography": [
        ("Capital of Spain?", "Madrid"),
        ("Capital of Italy?", "Rome"),
        ("Capital of Peru?", "Lima"),
    ],
    "history": [("Year the Berlin Wall fell?", "1989"), ("Year of the Moon landing?", "1969")],
}
QUESTIONS = [
    ("geography", "Capital of Norway?"),
    ("history", "Year the Titanic sank?"),
    ("geography", "Capital of Kenya?"),
    ("history", "Year the First World War began?"),
    ("geography", "Capital of Japan?"),
]


def request(kind: str, question: str) -> Request:
    messages: list[Message] = []
    for q, a in DEMOS[kind]:
        messages += [Message.user(q), Message.assistant(f'{{"answer": "{a}"}}')]
    return Request(
        model="local/test",
        system=f"Answer the {kind} question in JSON.",
        messages=(*messages, Message.user(question)),
        config=Config(max_tokens=24, response_format={"type": "json_schema", "schema": SCHEMA}),
    )


@pytest.fixture(scope="module")
def engine(stageflow_local_lm: Any) -> LlamaCppEngine:
    eng: LlamaCppEngine = stageflow_local_lm.engine
    return eng


def test_alternating_predictors_give_the_same_bytes_with_and_without_the_prefix_cache(engine) -> None:
    plain = LlamaCppEngine(engine.model_path, n_threads=engine.n_threads, prefix_slots=0)
    cached = LlamaCppEngine(engine.model_path, n_threads=engine.n_threads, prefix_slots=8)
    model = cached._model()
    assert model is plain._model(), "both engines share the loaded model"
    assert model.snapshots, "the pinned llama-cpp-python must support sequence snapshots"
    without = [plain.complete(request(k, q)).text for k, q in QUESTIONS]
    model.prefix.clear()
    restores = model.prefix.restores
    with_cache = [cached.complete(request(k, q)).text for k, q in QUESTIONS]
    assert with_cache == without
    assert model.prefix.restores - restores >= 3  # every switch back restored its predictor's prefix
    assert all(text.startswith("{") for text in without)


def test_logprobs_spell_the_output_and_change_nothing(stageflow_local_lm) -> None:
    predict = dspy.Predict("question -> answer")
    with dspy.context(lm=stageflow_local_lm, adapter=dspy.JSONAdapter()):
        plain = predict(question="What is the capital of France?")
        scored = predict(
            question="What is the capital of France?", config={"logprobs": True, "top_logprobs": 2}
        )
    raw = stageflow_local_lm.history[-1]["outputs"][0]
    tokens = scored.logprobs["content"]
    assert scored.answer == plain.answer
    assert "".join(t["token"] for t in tokens) == raw["text"]
    assert all(t["logprob"] <= 0.0 for t in tokens)
    assert all(len(t["top_logprobs"]) == 2 for t in tokens)


def test_choose_by_likelihood_scores_every_candidate(stageflow_local_lm) -> None:
    from stageflow.choose import Choose

    pick = Choose("question, candidates -> answer", scoring="likelihood")
    candidates = ["Paris", "Lyon", "Marseille"]
    with dspy.context(lm=stageflow_local_lm, adapter=dspy.JSONAdapter()):
        result = pick(question="What is the capital of France?", candidates=candidates)
    assert result.answer in candidates
    assert set(result.choice_scores) == set(candidates)
    assert result.choice_scores[result.answer] == max(result.choice_scores.values())
    assert all(score < 0.0 for score in result.choice_scores.values())
