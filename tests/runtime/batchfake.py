"""Pipeline components for batch tests that run in another process (a ``stageflow batch``
subprocess, a Ray worker): a predictor with its own FakeLM whose every call is appended to a log
file, so a test can count the LM calls each record caused across processes and kills."""

from __future__ import annotations

import time
from typing import Any

import dspy

from stageflow.testing import FakeLM


def failing(text: str, fail_every: int) -> bool:
    """Whether the record ``t-<n>`` is scripted to fail (every ``fail_every``-th one)."""
    return bool(fail_every) and int(text.rsplit("-", 1)[1]) % fail_every == 0


def make_stage(log: str, latency: float = 0.0, fail_every: int = 0) -> Any:
    """``Predict("text -> answer")`` with its own FakeLM (``answer = text.upper()``)."""

    def answer(inputs: dict[str, Any]) -> str:
        text = inputs["text"]
        with open(log, "a", encoding="utf-8") as fh:  # one short O_APPEND write per call
            fh.write(text + "\n")
        if failing(text, fail_every):
            raise ValueError(f"scripted failure for {text}")
        return text.upper()

    predict = dspy.Predict("text -> answer")
    predict.lm = FakeLM({"answer": answer}, latency=latency)
    return predict


def slow_length(answer: str, delay: float = 0.0) -> dict[str, int]:
    """A function stage: the answer's length (after ``delay`` seconds)."""
    if delay:
        time.sleep(delay)
    return {"length": len(answer)}


def make_fake_lm(latency: float = 0.0) -> Any:
    """A FakeLM factory for Ray workers (FakeLM holds a lock, so it is built where it runs)."""
    return FakeLM({"answer": lambda inputs: str(next(iter(inputs.values()))).upper()}, latency=latency)


def pipeline_yaml(log: str, latency: float, fail_every: int) -> str:
    """A pipeline file using :func:`make_stage` (load it with ``--allow-module batchfake``)."""
    return (
        "inputs: [text]\n"
        "root:\n"
        "  type: pipeline\n"
        "  stages:\n"
        "  - component: 'batchfake:make_stage'\n"
        f"    args: {{log: '{log}', latency: {latency}, fail_every: {fail_every}}}\n"
    )


def log_counts(log: str) -> dict[str, int]:
    """LM calls per record text so far."""
    counts: dict[str, int] = {}
    try:
        with open(log, encoding="utf-8") as fh:
            for line in fh:
                if line.endswith("\n"):
                    counts[line[:-1]] = counts.get(line[:-1], 0) + 1
    except FileNotFoundError:
        pass
    return counts


def reject_every(n: int) -> Any:
    """A function stage failing for every ``n``-th record ``t-<k>`` (a closure: pickled by value)."""

    def check(text: str, answer: str) -> dict[str, bool]:
        if failing(text, n):
            raise ValueError(f"rejected {text}")
        return {"checked": True}

    return check


def dying_stage(text: str) -> dict[str, str]:
    """A function stage whose process kills itself (SIGKILL) on every record."""
    import os
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
    return {"never": text}


def dying_pipeline_yaml() -> str:
    """A pipeline file using :func:`dying_stage`."""
    return "inputs: [text]\nroot:\n  type: pipeline\n  stages:\n  - component: 'batchfake:dying_stage'\n"
