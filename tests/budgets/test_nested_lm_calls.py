"""An LM call made inside another one — a ``forward`` of yours on a ``dspy.LM`` subclass that calls
DSPy's own (DSPy 3.4's deprecated, still supported interface), which runs DSPy's LM execution again
for the same request — is one LM call: counted once in the usage and the budgets. Before, it was
counted twice, and under a token or cost budget it waited forever on its own reservation (helper
101, D1/D2)."""

from __future__ import annotations

import asyncio
import threading
import warnings
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import SequentialPipeline
from stageflow.testing import FakeLM, call


class Delegating(FakeLM):
    """Overrides ``forward`` / ``aforward`` and calls DSPy's own."""

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        return super().forward(prompt=prompt, messages=messages, **kwargs)

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        return await super().aforward(prompt=prompt, messages=messages, **kwargs)


@pytest.fixture(autouse=True)
def _quiet() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


@pytest.mark.parametrize("limit", [{"max_tokens": 100_000}, {"max_cost": 10.0}, {"max_calls": 5}])
async def test_a_budget_counts_it_once_and_does_not_wait_on_itself(mode: str, limit: dict[str, Any]) -> None:
    lm = Delegating({"answer": "42"}, model="fake/delegating")
    program = SequentialPipeline([dspy.Predict("question -> answer")])
    outcome: list[Any] = []

    def run() -> None:
        with dspy.context(lm=lm), stageflow.budget(**limit) as spent:
            outcome.append((asyncio.run(call(program, mode, question="?")).answer, spent.calls))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "the LM call waited on its own budget reservation"
    assert outcome == [("42", 1)]


async def test_the_usage_counts_it_once(mode: str) -> None:
    plain, delegating = FakeLM({"answer": "42"}), Delegating({"answer": "42"})
    program = SequentialPipeline([dspy.Predict("question -> answer")])
    usage = []
    for lm in (plain, delegating):
        with dspy.context(lm=lm):
            usage.append((await call(program, mode, question="?")).run.usage.total)
    assert usage[1].lm_calls == usage[0].lm_calls == 1
    assert usage[1].input_tokens == usage[0].input_tokens > 0


class Router(dspy.LM):  # type: ignore[misc]
    """An LM whose ``forward`` calls another LM: the inner calls are requests of their own."""

    def __init__(self, inner: Any) -> None:
        super().__init__("router/r", cache=False, num_retries=0)
        self.inner = inner

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        return self.inner.forward(prompt=prompt, messages=messages, **kwargs)


def test_the_calls_a_router_lm_makes_to_another_lm_are_rate_limited() -> None:
    """(helper 103, F2) Counting a call made inside another once must not hide another model's
    calls: a first version let a router's calls to its inner model past that model's rate limit."""
    inner = FakeLM({"answer": "A"}, model="fake/routed-inner")
    program = SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=Router(inner)), stageflow.rate_limit("fake/routed-inner", rpm=1000) as limiter:
        program(question="q1")
        program(question="q2")
    assert inner.calls == 2
    assert limiter.requests == 2
