"""Issue 9, RetryPolicy: LM errors that DSPy wraps are transient. An engine that lets a LiteLLM
exception through reaches stageflow as DSPy's ``LMUnexpectedError`` with the LiteLLM error as its
``__cause__``; those used to fail at once (179 of 500 inputs in the reliability run)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import dspy
import pytest
from dspy.utils.exceptions import LMBillingError, LMUnexpectedError

from sleeps_kit import Sleeps as Waits
from stageflow import RetryPolicy, SequentialPipeline, Stage, StageError
from stageflow.policies import is_retryable
from stageflow.testing import FakeLM, call


class RaisingLM(FakeLM):
    """A FakeLM whose engine raises ``errors`` in turn (DSPy wraps them), then answers."""

    def __init__(self, errors: list[Callable[[], Exception]], **kwargs: Any) -> None:
        super().__init__({"answer": "Paris"}, **kwargs)
        self.errors = list(errors)
        self.attempts = 0

    def _respond(self, request: Any) -> Any:
        self.attempts += 1
        if self.errors:
            raise self.errors.pop(0)()
        return super()._respond(request)


def policy(waits: Waits) -> RetryPolicy:
    return RetryPolicy(max_attempts=4, initial_delay=0.01, jitter=0, sleep=waits.sleep, asleep=waits.asleep)


# -- errors that only carry an HTTP status (no third-party import needed) -------------------------


class StatusError(Exception):
    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code}")
        self.status_code = status_code


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 529])
async def test_an_engine_error_with_a_transient_status_is_retried(mode: str, status: int) -> None:
    waits = Waits()
    lm = RaisingLM([lambda: StatusError(status)])
    p = SequentialPipeline([Stage(dspy.Predict("question -> answer"), retry=policy(waits))])
    with dspy.context(lm=lm):
        result = await call(p, mode, question="capital of France?")
    assert result.answer == "Paris"
    [event] = result.run.events
    assert event.kind == "retry"
    assert event.error.startswith("LMUnexpectedError")  # DSPy wrapped it; the cause decided


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422, 501])
async def test_an_engine_error_with_a_final_status_is_not_retried(mode: str, status: int) -> None:
    lm = RaisingLM([lambda: StatusError(status)])
    p = SequentialPipeline([Stage(dspy.Predict("question -> answer"), retry=policy(Waits()))])
    with dspy.context(lm=lm), pytest.raises(StageError) as info:
        await call(p, mode, question="q")
    assert isinstance(info.value.__cause__, LMUnexpectedError)
    assert lm.attempts == 1


def test_dspy_s_own_verdict_wins_over_the_status_of_its_cause() -> None:
    """A quota error travels as HTTP 429, but DSPy classified it as billing: never retried."""
    billing = LMBillingError("insufficient quota", model="m", status=429)
    billing.__cause__ = StatusError(429)
    assert is_retryable(StatusError(429))
    assert not is_retryable(billing)


# -- real LiteLLM exceptions ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    import litellm

    return litellm


def _transient(litellm: Any) -> dict[str, Callable[[], Exception]]:
    return {
        "RateLimitError": lambda: litellm.RateLimitError("slow down", llm_provider="openai", model="gpt"),
        "ServiceUnavailableError": lambda: litellm.ServiceUnavailableError(
            "overloaded", llm_provider="openai", model="gpt"
        ),
        "APIConnectionError": lambda: litellm.APIConnectionError("reset", llm_provider="openai", model="gpt"),
        "Timeout": lambda: litellm.Timeout("read timed out", model="gpt", llm_provider="openai"),
        "InternalServerError": lambda: litellm.InternalServerError(
            "oops", llm_provider="openai", model="gpt"
        ),
        "BadGatewayError": lambda: litellm.BadGatewayError("bad gateway", llm_provider="openai", model="gpt"),
    }


TRANSIENT = [
    "RateLimitError",
    "ServiceUnavailableError",
    "APIConnectionError",
    "Timeout",
    "InternalServerError",
    "BadGatewayError",
]


@pytest.mark.integration
@pytest.mark.parametrize("name", TRANSIENT)
async def test_litellm_transient_errors_wrapped_by_dspy_are_retried(
    mode: str, name: str, litellm: Any
) -> None:
    waits = Waits()
    make = _transient(litellm)[name]
    lm = RaisingLM([make, make])
    p = SequentialPipeline([Stage(dspy.Predict("question -> answer"), retry=policy(waits))])
    with dspy.context(lm=lm):
        result = await call(p, mode, question="capital of France?")
    assert result.answer == "Paris"
    assert lm.attempts == 3
    assert [e.kind for e in result.run.events] == ["retry", "retry"]
    assert all(e.error.startswith("LMUnexpectedError") for e in result.run.events)
    assert waits.delays == [0.01, 0.02]


@pytest.mark.integration
async def test_a_litellm_rate_limit_s_retry_after_header_is_read_and_capped(mode: str, litellm: Any) -> None:
    import httpx

    request = httpx.Request("POST", "https://api.example.invalid/v1/chat/completions")
    response = httpx.Response(429, request=request, headers={"retry-after": "86400"})

    def limited() -> Exception:
        return litellm.RateLimitError("slow down", llm_provider="openai", model="gpt", response=response)

    waits = Waits()
    lm = RaisingLM([limited])
    retry = RetryPolicy(max_delay=20.0, sleep=waits.sleep, asleep=waits.asleep)
    p = SequentialPipeline([Stage(dspy.Predict("question -> answer"), retry=retry)])
    with dspy.context(lm=lm):
        result = await call(p, mode, question="q")
    assert result.answer == "Paris"
    assert waits.delays == [20.0]
    assert result.run.events[0].detail == {"retry_after": 86400.0}


@pytest.mark.integration
@pytest.mark.parametrize("name", ["BadRequestError", "AuthenticationError", "ContextWindowExceededError"])
async def test_litellm_final_errors_are_not_retried(mode: str, name: str, litellm: Any) -> None:
    cls = getattr(litellm, name)
    lm = RaisingLM([lambda: cls("no", llm_provider="openai", model="gpt")])
    p = SequentialPipeline([Stage(dspy.Predict("question -> answer"), retry=policy(Waits()))])
    with dspy.context(lm=lm), pytest.raises(StageError) as info:
        await call(p, mode, question="q")
    assert lm.attempts == 1
    assert isinstance(info.value.__cause__, LMUnexpectedError)
    assert isinstance(info.value.__cause__.__cause__, cls)
