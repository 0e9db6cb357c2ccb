"""Programs and LMs shared by the usage, profiler and OpenTelemetry tests."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import dspy

import stageflow
from stageflow.testing import FakeLM

#: How wide the fan-out of :func:`fan_out_program` is.
WIDTH = 32


def fan_out_lm(**options: Any) -> FakeLM:
    """A fake LM that decomposes into :data:`WIDTH` sub-questions and answers every stage."""
    return FakeLM(
        {
            "sub_questions": [f"sub question {i}" for i in range(WIDTH)],
            "fact": lambda inputs: f"fact about {inputs['sub_question']}",
            "answer": "Paris",
            "confidence": 0.9,
        },
        **options,
    )


def fan_out_program() -> stageflow.SequentialPipeline:
    """decompose → 32-way ForEach over a predictor → a 3-member ensemble → a function stage."""
    return stageflow.SequentialPipeline(
        [
            dspy.Predict("question -> sub_questions: list[str]"),
            stageflow.ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts"),
            stageflow.EnsemblePipeline(
                [dspy.Predict("question, facts: list[str] -> answer, confidence: float") for _ in range(3)]
            ),
            stageflow.stage(lambda answer: {"shout": answer.upper()}, writes=["shout"], name="shout"),
        ]
    )


class CostlyLM(dspy.BaseLM):  # type: ignore[misc]
    """A model that reports its price: an OpenAI-shaped response with LiteLLM's ``response_cost``.

    (DSPy's legacy ``BaseLM.forward`` interface; it is the path through which DSPy 3.4.1 reads a
    provider-reported cost into ``lm.history[i]["cost"]``.)
    """

    def __init__(self, price: float = 0.25, *, answer: str = "yes", cache: bool = False) -> None:
        super().__init__(model="costly/model-1", model_type="chat", cache=cache)
        self.price = price
        self.answer = answer
        self.calls = 0

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        return self.forward(prompt, messages, **kwargs)

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        self.calls += 1
        text = f"[[ ## answer ## ]]\n{self.answer}\n\n[[ ## completed ## ]]"
        message = SimpleNamespace(content=text, role="assistant", tool_calls=None)
        choice = SimpleNamespace(message=message, finish_reason="stop", index=0, logprobs=None)
        return SimpleNamespace(
            choices=[choice],
            usage={"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
            model="costly/model-1",
            _hidden_params={"response_cost": self.price},
            cache_hit=False,
        )


@contextlib.contextmanager
def quiet_legacy_lm() -> Iterator[None]:
    """Silence DSPy's deprecation warning for the legacy ``BaseLM.forward`` interface."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*BaseLM.forward.*deprecated")
        yield
