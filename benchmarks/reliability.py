"""Reliability under injected faults: retries + repair + timeouts over 500 inputs.

Run: ``python benchmarks/reliability.py``. A fault-injecting fake LM fails 30% of calls with a
transient server error, 5% with a timeout (it stalls past the stage timeout) and answers 5% with
malformed output; a 3-stage pipeline with a RetryPolicy, a TimeoutPolicy and a RepairPolicy on every
stage runs all inputs through a ForEach (concurrency 32). Every input must either complete or
report its error.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from typing import Any

import dspy
from dspy import lm15

import stageflow
from stageflow.testing import FakeLM

N = 500
SEED = 7


class FaultyLM(FakeLM):
    """FakeLM that injects transient errors, stalls and malformed output at fixed rates."""

    def __init__(self, *args: Any, rng: random.Random, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rng = rng
        self.rng_lock = threading.Lock()
        self.injected: Counter[str] = Counter()

    def _respond(self, request: Any) -> Any:
        with self.rng_lock:
            roll = self.rng.random()
        if roll < 0.30:
            self.injected["transient"] += 1
            raise lm15.ServerError("injected 503", provider="fake")
        if roll < 0.35:
            self.injected["timeout"] += 1
            time.sleep(0.3)  # past the stage's 0.1 s timeout
        response = super()._respond(request)
        if 0.35 <= roll < 0.40:
            self.injected["malformed"] += 1
            return type(response)(
                id=None,
                model=response.model,
                message=lm15.Message.assistant("{not json"),
                finish_reason="stop",
                usage=response.usage,
            )
        return response


def main() -> None:
    lm = FaultyLM({"keywords": ["k"], "summary": "s", "answer": "a"}, rng=random.Random(SEED))
    policies = {
        "retry": stageflow.RetryPolicy(max_attempts=8, initial_delay=0.001, max_delay=0.01),
        "timeout": stageflow.TimeoutPolicy(0.1),
        "repair": stageflow.RepairPolicy(max_repairs=3),
    }
    per_item = stageflow.SequentialPipeline(
        [
            stageflow.Stage(dspy.Predict("question -> keywords: list[str]"), **policies),
            stageflow.Stage(dspy.Predict("question, keywords: list[str] -> summary"), **policies),
            stageflow.Stage(dspy.Predict("question, summary -> answer"), **policies),
        ]
    )
    batch = stageflow.ForEach(
        per_item, over="questions", item="question", collect={"answer": "answers"}, max_concurrency=32
    )
    questions = [f"question {i}?" for i in range(N)]
    t0 = time.perf_counter()
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        result = batch(questions=questions)
    wall = time.perf_counter() - t0
    completed = sum(1 for a in result.answers if a is not None)
    failed = len(result.item_errors)
    events = Counter(e.kind for e in result.run.events)
    print(f"# Reliability: {N} inputs × 3 stages, fault-injecting fake LM (seed {SEED})\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| inputs completed | {completed} |")
    print(f"| inputs that reported an error | {failed} |")
    print(f"| inputs lost (neither) | {N - completed - failed} |")
    print(f"| LM calls | {lm.calls} |")
    for kind in ("transient", "timeout", "malformed"):
        print(f"| injected {kind} faults | {lm.injected[kind]} |")
    for kind in ("retry", "repair", "timeout", "fallback"):
        print(f"| policy events: {kind} | {events.get(kind, 0)} |")
    after_timeout = sum(
        1 for e in result.run.events if e.kind == "retry" and e.error.startswith("StageTimeoutError")
    )
    print(f"| of which retries after a stage timeout | {after_timeout} |")
    print(f"| wall time | {wall:.1f} s |")
    for e in result.item_errors[:3]:
        print(
            f"\nexample reported error (item {e['index']}): "
            f"{type(e['error']).__name__}: {str(e['error'])[:160]}"
        )
    assert completed + failed == N


if __name__ == "__main__":
    main()
