"""Score the program on a question set, and compile it with ``BootstrapFewShot``.

Evaluation runs the questions one after another (a local model serves one call at a time anyway)
and records, per question, the answer, how it matched and the wall time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dspy

from stageflow.apps.multihop.data import load_trainset, match_kind, qa_metric

__all__ = ["EvalReport", "QuestionResult", "compile_program", "evaluate_program", "with_train_demos"]


@dataclass(frozen=True)
class QuestionResult:
    """One evaluated question."""

    question: str
    gold: str
    answer: str
    match: str | None
    seconds: float
    sub_questions: list[str] = field(default_factory=list)
    error: str | None = None


@dataclass
class EvalReport:
    """Scores over a question set: ``exact`` and ``matched`` (exact or contains) are fractions."""

    results: list[QuestionResult]

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def exact(self) -> float:
        return sum(r.match == "exact" for r in self.results) / self.n if self.n else 0.0

    @property
    def matched(self) -> float:
        return sum(r.match is not None for r in self.results) / self.n if self.n else 0.0

    @property
    def errors(self) -> int:
        return sum(r.error is not None for r in self.results)

    @property
    def mean_seconds(self) -> float:
        return sum(r.seconds for r in self.results) / self.n if self.n else 0.0


def evaluate_program(
    program: Any,
    examples: Sequence[dspy.Example],
    *,
    lm: Any = None,
    adapter: Any = None,
    on_result: Callable[[QuestionResult], None] | None = None,
) -> EvalReport:
    """Run ``program`` on each example and score the answers with :func:`match_kind`.

    Args:
        program: A multi-hop program (anything called as ``program(question=...)``).
        examples: ``dspy.Example`` with ``question``, ``answer`` and ``aliases``.
        lm, adapter: Used for the run when given (else DSPy's configured ones).
        on_result: Called after each question (for progress output).

    A question whose run raises counts as wrong; its error is recorded, the evaluation goes on.
    """
    settings = {k: v for k, v in {"lm": lm, "adapter": adapter}.items() if v is not None}
    results: list[QuestionResult] = []
    with dspy.context(**settings):
        for ex in examples:
            started = time.perf_counter()
            try:
                pred = program(question=ex.question)
                answer, subs, error = str(pred.answer), list(pred.sub_questions), None
                kind = match_kind(pred, ex)
            except Exception as exc:  # one failed question must not end the evaluation
                answer, subs, error, kind = "", [], f"{type(exc).__name__}: {exc}", None
            result = QuestionResult(
                question=ex.question,
                gold=ex.answer,
                answer=answer,
                match=kind,
                seconds=time.perf_counter() - started,
                sub_questions=subs,
                error=error,
            )
            results.append(result)
            if on_result is not None:
                on_result(result)
    return EvalReport(results)


def compile_program(
    program: Any,
    trainset: Sequence[dspy.Example],
    *,
    lm: Any = None,
    adapter: Any = None,
    max_bootstrapped_demos: int = 2,
    max_labeled_demos: int = 4,
    max_rounds: int = 1,
) -> Any:
    """Compile ``program`` with ``dspy.BootstrapFewShot`` and :func:`qa_metric`; returns the new program.

    The train set's gold ``sub_questions``, ``facts`` and ``answer`` make complete labeled demos for the
    decompose and synthesize predictors; bootstrapped demos (from runs whose answer matched) also
    cover the extract predictor.
    """
    settings = {k: v for k, v in {"lm": lm, "adapter": adapter}.items() if v is not None}
    optimizer = dspy.BootstrapFewShot(
        metric=qa_metric,
        max_bootstrapped_demos=max_bootstrapped_demos,
        max_labeled_demos=max_labeled_demos,
        max_rounds=max_rounds,
    )
    with dspy.context(**settings):
        return optimizer.compile(program, trainset=list(trainset))


def with_train_demos(program: Any, k: int = 4, trainset: Sequence[dspy.Example] | None = None) -> Any:
    """A copy of ``program`` with ``k`` labeled demos from the train set on each predictor
    (``dspy.LabeledFewShot``: no model calls).

    The train set's gold ``sub_questions``, ``facts`` and ``answer`` are complete demos for decompose and
    synthesize (a ``ChainOfThought`` synthesis shows them without reasoning); extract gets none that fit.
    """
    if k <= 0:
        return program
    examples = list(trainset) if trainset is not None else load_trainset()
    return dspy.LabeledFewShot(k=k).compile(program, trainset=examples)
