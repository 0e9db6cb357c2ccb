"""Multi-hop QA with linked retrieval: the evidence is found without a model, the model answers.

::

    stages[0]  function retrieve     question -> passages, linked   (BM25 + entity links, no model)
    stages[1]  function candidates   question, passages, linked -> candidates   (typed spans, no model)
    stages[2]  the answer stage, one of
               choose      Choose(ChooseAnswer): one LM call, constrained to the candidates
               likelihood  Choose(ChooseAnswer, scoring="likelihood"): one LM call per candidate
               first       function first_candidate: no model (the control)
               read        Predict(ReadAnswer): one LM call, free text from the passages

Every stage declares what it writes. The result has ``passages``, ``linked``, ``candidates``,
``answer`` and, for the choosers, ``choice_scores``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import dspy

from stageflow.apps.multihop.adapter import CompactJSONAdapter
from stageflow.apps.multihop.candidates import propose_candidates
from stageflow.apps.multihop.data import corpus_path, load_trainset, match_kind
from stageflow.apps.multihop.signatures import ChooseAnswer, ReadAnswer
from stageflow.choose import Choose, Scoring
from stageflow.errors import ConfigurationError
from stageflow.patterns.sequential import SequentialPipeline
from stageflow.stages import Stage, stage

__all__ = ["ANSWERERS", "Answerer", "LinkedQA", "build_linked_program", "first_candidate"]

Answerer = Literal["choose", "likelihood", "first", "read"]
ANSWERERS: tuple[Answerer, ...] = ("choose", "likelihood", "first", "read")


def first_candidate(candidates: list[str]) -> dict[str, str]:
    """The no-model answer: the first candidate (``""`` when there is none).

    Examples:
        >>> first_candidate(["Steventon", "Hampshire"])
        {'answer': 'Steventon'}
    """
    return {"answer": str(candidates[0]) if candidates else ""}


class LinkedQA(SequentialPipeline):
    """retrieve → candidates → answer, a :class:`SequentialPipeline` (see :func:`build_linked_program`)."""

    def __init__(self, stages: list[Any], *, answerer: Answerer) -> None:
        super().__init__(stages)
        self.answerer = answerer

    @property
    def uses_lm(self) -> bool:
        """Whether the answer stage calls a model."""
        return self.answerer != "first"

    def adapter(self) -> dspy.Adapter:
        """The terse JSON adapter these prompts are written for."""
        return CompactJSONAdapter()

    def answer_predictor(self) -> dspy.Predict | None:
        """The answer stage's predictor (``None`` for the no-model control)."""
        for _, predictor in self.named_predictors():
            return predictor
        return None

    def add_train_demos(self, k: int, trainset: Sequence[dspy.Example] | None = None) -> LinkedQA:
        """Give the answer predictor ``k`` complete demos from the train set; returns ``self``.

        The no-model stages run on train questions (retrieval and candidates), so each demo has
        real passages and candidates; questions whose gold answer is not among the candidates are
        skipped. No model is called.
        """
        predictor = self.answer_predictor()
        if predictor is None or k <= 0:
            return self
        examples = list(trainset) if trainset is not None else load_trainset()
        fields = predictor.signature.input_fields
        demos: list[dspy.Example] = []
        for ex in examples:
            if len(demos) >= k:
                break
            state: dict[str, Any] = {"question": ex.question}
            for step in self.stages[:2]:
                state.update(dict(step(**state).items()))
            gold = next((c for c in state["candidates"] if match_kind(c, ex) == "exact"), None)
            if gold is not None:
                demo = {name: state[name] for name in fields if name in state}
                demos.append(dspy.Example(**demo, answer=gold).with_inputs(*demo))
        predictor.demos = demos
        return self


def _answer_stage(answerer: Answerer) -> Any:
    reads = ["question", "passages", "candidates"]
    if answerer in ("choose", "likelihood"):
        scoring: Scoring = "generate" if answerer == "choose" else "likelihood"
        return Stage(Choose(ChooseAnswer, scoring=scoring), reads=reads, writes=["answer", "choice_scores"])
    if answerer == "first":
        return stage(first_candidate, writes=["answer"], name="first candidate")
    if answerer == "read":
        return dspy.Predict(ReadAnswer)
    raise ConfigurationError(
        f"unknown answer stage {answerer!r}.",
        field="answerer",
        code="bad_setting",
        hint=f"use one of {', '.join(ANSWERERS)}",
    )


def build_linked_program(retriever: Any = None, *, k: int = 2, answerer: Answerer = "choose") -> LinkedQA:
    """Build the linked-retrieval QA program.

    Args:
        retriever: A :class:`~stageflow.retrieval.LinkedRetriever`; default: over the shipped corpus.
        k: Hop-1 passages when building the default retriever (each adds at most one linked passage).
        answerer: The answer stage: ``"choose"``, ``"likelihood"``, ``"first"`` or ``"read"``.

    Raises:
        ConfigurationError: an unknown ``answerer``.
    """
    from stageflow.retrieval import BM25Retriever, LinkedRetriever, linked_retrieval_stage

    answer = _answer_stage(answerer)  # checks the name before any index is built
    if retriever is None:
        retriever = LinkedRetriever(BM25Retriever(corpus_path()), k=k)
    return LinkedQA(
        [
            linked_retrieval_stage(retriever),
            stage(propose_candidates, writes=["candidates"], name="candidates"),
            answer,
        ],
        answerer=answerer,
    )
