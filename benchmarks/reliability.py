"""Reliability under injected faults: retries + repair + timeouts over 500 inputs.

Run: ``python benchmarks/reliability.py``. A fault-injecting fake LM fails 30% of calls with a
transient error, 5% with a timeout (it stalls past the stage timeout) and answers 5% with
malformed output; a 3-stage pipeline with a RetryPolicy, a TimeoutPolicy and a RepairPolicy on every
stage runs all inputs through a ForEach (concurrency 32, ``on_error="collect"``). Every input must
either complete or report a typed stageflow error.

Three runs, side by side, on the same seed:

- ``lm15``: the transient errors are DSPy's own (``lm15.ServerError`` → ``LMServerError``);
- ``litellm, DSPy's verdict only``: the transient errors are real LiteLLM exceptions
  (``RateLimitError`` with a ``Retry-After`` header, ``ServiceUnavailableError``,
  ``APIConnectionError``, ``Timeout``) raised by the engine, which DSPy wraps in
  ``LMUnexpectedError``; the policy retries only what DSPy itself classifies as retryable (the
  classification stageflow used before);
- ``litellm, stageflow``: the same errors under the default ``RetryPolicy`` classification.

Threads are counted with ``threading.enumerate()`` before and after each run: threads that are
not stageflow's and were not there before must all be gone; stageflow's long-lived pool threads
and its spare threads (calls under a TimeoutPolicy, abandoned ones included) are reported
separately, and the spare threads once more after their idle time.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import dspy
from dspy import lm15
from dspy.utils.exceptions import is_retryable_lm_error

import stageflow
from stageflow.engine import spare
from stageflow.policies import is_retryable
from stageflow.policies.transient import causes
from stageflow.testing import FakeLM

N = 500
SEED = 7


def _litellm_errors() -> list[Callable[[], Exception]]:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import
    import httpx
    import litellm

    request = httpx.Request("POST", "https://api.example.invalid/v1/chat/completions")
    limited = httpx.Response(429, request=request, headers={"retry-after": "86400"})
    return [
        lambda: litellm.RateLimitError("slow down", llm_provider="openai", model="gpt", response=limited),
        lambda: litellm.ServiceUnavailableError("overloaded", llm_provider="openai", model="gpt"),
        lambda: litellm.APIConnectionError("connection reset", llm_provider="openai", model="gpt"),
        lambda: litellm.Timeout("read timed out", model="gpt", llm_provider="openai"),
    ]


class FaultyLM(FakeLM):
    """FakeLM that injects transient errors, stalls and malformed output at fixed rates."""

    def __init__(
        self, *args: Any, rng: random.Random, transient: list[Callable[[], Exception]], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.rng = rng
        self.transient = transient
        self.rng_lock = threading.Lock()
        self.injected: Counter[str] = Counter()

    def _respond(self, request: Any) -> Any:
        with self.rng_lock:
            roll = self.rng.random()
            pick = self.rng.randrange(len(self.transient))
        if roll < 0.30:
            self.injected["transient"] += 1
            raise self.transient[pick]()
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


def dspy_verdict_only(error: BaseException) -> bool:
    """The classification before this change: timeouts, connection errors and DSPy's own verdict."""
    return any(
        isinstance(e, TimeoutError | ConnectionError)
        or (isinstance(e, Exception) and is_retryable_lm_error(e))
        for e in causes(error)
    )


def _stageflow_thread(t: threading.Thread) -> str | None:
    if t.name.startswith("stageflow-spare"):
        return "spare"
    if t.name.startswith("stageflow"):
        return "pool"
    return None


def run(name: str, transient: list[Callable[[], Exception]], retry_on: Any) -> dict[str, Any]:
    lm = FaultyLM(
        {"keywords": ["k"], "summary": "s", "answer": "a"}, rng=random.Random(SEED), transient=transient
    )
    policies = {
        "retry": stageflow.RetryPolicy(
            max_attempts=8, initial_delay=0.001, max_delay=0.01, retry_on=retry_on
        ),
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
        per_item,
        over="questions",
        item="question",
        collect={"answer": "answers"},
        max_concurrency=32,
        on_error="collect",
    )
    questions = [f"question {i}?" for i in range(N)]
    before = {t.ident for t in threading.enumerate()}
    t0 = time.perf_counter()
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        result = batch(questions=questions)
    wall = time.perf_counter() - t0
    now = threading.enumerate()
    left = [t for t in now if t.ident not in before and _stageflow_thread(t) is None]
    ours = Counter(_stageflow_thread(t) for t in now)
    completed = sum(1 for a in result.answers if a is not None)
    errors = [e["error"] for e in result.item_errors]
    events = Counter(e.kind for e in result.run.events)
    return {
        "name": name,
        "completed": completed,
        "failed": len(errors),
        "typed": sum(isinstance(e, stageflow.StageflowError) for e in errors),
        "lost": N - completed - len(errors),
        "calls": lm.calls,
        "injected": lm.injected,
        "events": events,
        "after_timeout": sum(
            1 for e in result.run.events if e.kind == "retry" and e.error.startswith("StageTimeoutError")
        ),
        "wrapped": sum(
            1 for e in result.run.events if e.kind == "retry" and e.error.startswith("LMUnexpectedError")
        ),
        "wall": wall,
        "left_other": len(left),
        "pool": ours["pool"],
        "spare": ours["spare"],
        "error_types": Counter(type(e).__name__ for e in errors),
        "example": errors[0] if errors else None,
    }


def main() -> None:
    from _harness import machine_note

    litellm_errors = _litellm_errors()
    runs = [
        run("lm15", [lambda: lm15.ServerError("injected 503", provider="fake")], is_retryable),
        run("litellm, DSPy's verdict only", litellm_errors, dspy_verdict_only),
        run("litellm, stageflow", litellm_errors, is_retryable),
    ]
    time.sleep(spare.IDLE_SECONDS + 1.0)
    spare_later = spare.spare_thread_count()
    print(f"# Reliability: {N} inputs × 3 stages, fault-injecting fake LM (seed {SEED})\n")
    print(f"{machine_note()}\n")
    print("| measure | " + " | ".join(r["name"] for r in runs) + " |")
    print("|---|" + "---|" * len(runs))

    def row(label: str, get: Callable[[dict[str, Any]], Any]) -> None:
        print(f"| {label} | " + " | ".join(str(get(r)) for r in runs) + " |")

    row("inputs completed", lambda r: f"{r['completed']} ({r['completed'] / N:.1%})")
    row("inputs that reported an error", lambda r: r["failed"])
    row("… of which typed (StageflowError)", lambda r: r["typed"])
    row("inputs lost (neither)", lambda r: r["lost"])
    row("LM calls", lambda r: r["calls"])
    for kind in ("transient", "timeout", "malformed"):
        row(f"injected {kind} faults", lambda r, k=kind: r["injected"][k])
    for kind in ("retry", "repair", "timeout", "fallback"):
        row(f"policy events: {kind}", lambda r, k=kind: r["events"].get(k, 0))
    row("retries of LMUnexpectedError (wrapped by DSPy)", lambda r: r["wrapped"])
    row("retries after a stage timeout", lambda r: r["after_timeout"])
    row("wall time", lambda r: f"{r['wall']:.1f} s")
    row("threads left behind (not stageflow's)", lambda r: r["left_other"])
    row("stageflow pool threads alive right after (long-lived)", lambda r: r["pool"])
    row("stageflow spare threads alive right after (exit when idle)", lambda r: r["spare"])
    idle = spare.IDLE_SECONDS + 1.0
    print(f"\nstageflow spare threads alive {idle:.0f} s after the last run: {spare_later}")
    for r in runs:
        if r["example"] is not None:
            e = r["example"]
            print(
                f"\n{r['name']}: errors by type {dict(r['error_types'])}; e.g. "
                f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
            )
    for r in runs:
        assert r["completed"] + r["failed"] == N, r["name"]
        assert r["typed"] == r["failed"], r["name"]
        assert r["left_other"] == 0, r["name"]
    assert runs[-1]["completed"] >= 0.99 * N
    assert spare_later == 0


if __name__ == "__main__":
    main()
