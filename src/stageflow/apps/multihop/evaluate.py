"""Score any question-answering program on a question set, and compile it with ``BootstrapFewShot``.

:func:`evaluate_program` runs the questions one after another (a local model serves one call at a
time anyway) and records, per question, the answer and how it matched the gold answer or an alias
(exact, or exact-or-contains), the wall time, the LM calls made, and, when the program exposes the
passages it read, which supporting passages it found (retrieval recall). It reads the answer from
a named field, so every architecture is scored the same way; a program that does not produce that
field is an error, never a silent zero.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dspy
from dspy.utils.callback import BaseCallback

from stageflow.apps.multihop.data import corpus_path, load_trainset, match_kind, qa_metric
from stageflow.errors import ConfigurationError

__all__ = [
    "EvalReport",
    "LMCallCounter",
    "QuestionResult",
    "compile_program",
    "count_lm_calls",
    "evaluate_program",
    "passages_of",
    "with_train_demos",
]


@dataclass(frozen=True)
class QuestionResult:
    """One evaluated question.

    ``recall`` is the fraction of the example's supporting passages among the passages the program
    read (``None`` when the program exposes no passages or the example lists none).
    """

    question: str
    gold: str
    answer: str
    match: str | None
    seconds: float
    lm_calls: int = 0
    recall: float | None = None
    error: str | None = None


@dataclass
class EvalReport:
    """Scores over a question set; fractions are of all questions (errors count as wrong)."""

    results: list[QuestionResult]

    @property
    def n(self) -> int:
        return len(self.results)

    def _mean(self, values: Iterable[float]) -> float:
        return sum(values) / self.n if self.n else 0.0

    @property
    def exact(self) -> float:
        """Share of answers equal to the gold answer or an alias (after normalisation)."""
        return self._mean(r.match == "exact" for r in self.results)

    @property
    def matched(self) -> float:
        """Share of answers that equal or contain the gold answer or an alias."""
        return self._mean(r.match is not None for r in self.results)

    @property
    def recall(self) -> float | None:
        """Mean supporting-passage recall over the questions that have one (``None``: none has)."""
        known = [r.recall for r in self.results if r.recall is not None]
        return sum(known) / len(known) if known else None

    @property
    def all_found(self) -> int | None:
        """Questions for which every supporting passage was read (``None``: recall unknown)."""
        known = [r.recall for r in self.results if r.recall is not None]
        return sum(value == 1.0 for value in known) if known else None

    @property
    def errors(self) -> int:
        return sum(r.error is not None for r in self.results)

    @property
    def mean_seconds(self) -> float:
        return self._mean(r.seconds for r in self.results)

    @property
    def lm_calls(self) -> float:
        """Mean LM calls per question."""
        return self._mean(r.lm_calls for r in self.results)


class LMCallCounter(BaseCallback):  # type: ignore[misc]
    """Counts LM calls made while it is one of DSPy's callbacks (see :func:`count_lm_calls`)."""

    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        with self._lock:
            self.calls += 1


@contextlib.contextmanager
def count_lm_calls() -> Iterator[LMCallCounter]:
    """Count the LM calls DSPy makes inside the block (``counter.calls``).

    Examples:
        >>> import dspy
        >>> from stageflow.testing import FakeLM
        >>> with dspy.context(lm=FakeLM({"answer": "4"})), count_lm_calls() as counter:
        ...     _ = dspy.Predict("question -> answer")(question="2+2?")
        >>> counter.calls
        1
    """
    counter = LMCallCounter()
    with dspy.context(callbacks=[*dspy.settings.get("callbacks", []), counter]):
        yield counter


def passages_of(prediction: Any, field: str = "passages") -> list[str] | None:
    """The passages a prediction exposes in ``field``, flattened (``None`` when it has none).

    Lists of lists (one list per sub-question) are flattened; ``None`` items are skipped.

    Examples:
        >>> passages_of({"passages": [["A: a"], ["B: b", None]]})
        ['A: a', 'B: b']
        >>> passages_of({"answer": "x"}) is None
        True
    """
    getter = prediction.get if hasattr(prediction, "get") else lambda k, d=None: getattr(prediction, k, d)
    value = getter(field, None)
    if value is None:
        return None
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop(0)
        if isinstance(item, list | tuple):
            stack[:0] = list(item)
        elif item is not None:
            out.append(str(item.get("text", item)) if isinstance(item, dict) else str(item))
    return out


class _Supports:
    """Maps supporting passage ids to what a retrieved passage looks like (``Title: text`` or text)."""

    def __init__(self, corpus: str | Path | None) -> None:
        from stageflow.retrieval import format_passage, read_corpus

        docs = read_corpus(corpus if corpus is not None else corpus_path())
        self.forms = {str(d["id"]): {format_passage(d), d["text"]} for d in docs}

    def recall(self, supporting: Sequence[Any], passages: list[str]) -> float:
        seen = set(passages)
        found = sum(bool(self.forms.get(str(i), set()) & seen) for i in supporting)
        return found / len(supporting)


def _answer(prediction: Any, field: str) -> str:
    keys = list(prediction.keys()) if hasattr(prediction, "keys") else []
    if field not in keys and getattr(prediction, field, None) is None:
        raise ConfigurationError(
            f"the program's result has no {field!r} field to score; it has {sorted(keys)}.",
            field=field,
            code="no_answer_field",
            hint="pass answer_field= naming the field that holds the answer",
        )
    value = prediction[field] if field in keys else getattr(prediction, field)
    return "" if value is None else str(value)


def evaluate_program(
    program: Any,
    examples: Sequence[dspy.Example],
    *,
    lm: Any = None,
    adapter: Any = None,
    answer_field: str = "answer",
    passages_field: str | None = "passages",
    corpus: str | Path | None = None,
    on_result: Callable[[QuestionResult], None] | None = None,
) -> EvalReport:
    """Run ``program`` on each example and score it, whatever its architecture.

    Args:
        program: Anything called as ``program(**example.inputs())`` that returns a prediction.
        examples: ``dspy.Example`` with inputs marked (``question``) and labels ``answer``,
            ``aliases`` and, for recall, ``supporting_ids``.
        lm, adapter: Used for the run when given (else DSPy's configured ones).
        answer_field: The prediction field holding the answer.
        passages_field: The prediction field holding the passages the program read (a list, or a
            list of lists); recall is reported when the program fills it. ``None``: no recall.
        corpus: The corpus the supporting ids refer to (default: the shipped one).
        on_result: Called after each question (for progress output).

    A question whose run raises counts as wrong; its error is recorded and the evaluation goes on.

    Raises:
        ConfigurationError: the program's result has no ``answer_field`` (checked on every
            question that runs): a different architecture is never silently scored zero.
    """
    supports: _Supports | None = None
    if passages_field is not None and any(ex.get("supporting_ids") for ex in examples):
        supports = _Supports(corpus)
    settings: dict[str, Any] = {k: v for k, v in {"lm": lm, "adapter": adapter}.items() if v is not None}
    results: list[QuestionResult] = []
    with dspy.context(**settings), count_lm_calls() as counter:
        for ex in examples:
            started, calls_before = time.perf_counter(), counter.calls
            recall: float | None = None
            error: str | None = None
            try:
                pred = program(**ex.inputs())
            except Exception as exc:  # one failed question must not end the evaluation
                answer, error, kind = "", f"{type(exc).__name__}: {exc}", None
            else:
                answer = _answer(pred, answer_field)
                kind = match_kind(answer, ex)
                passages = None if passages_field is None else passages_of(pred, passages_field)
                if supports is not None and passages is not None and ex.get("supporting_ids"):
                    recall = supports.recall(ex.supporting_ids, passages)
            result = QuestionResult(
                question=str(ex.get("question", "")),
                gold=str(ex.get("answer", "")),
                answer=answer,
                match=kind,
                seconds=time.perf_counter() - started,
                lm_calls=counter.calls - calls_before,
                recall=recall,
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
