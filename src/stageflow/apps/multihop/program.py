"""The multi-hop QA program: decompose → for each sub-question (retrieve, extract) → synthesize.

Built only from stageflow patterns, so it is a ``dspy.Module`` that DSPy optimizers compile::

    stages[0]                      Predict(Decompose)         question -> sub_questions
    stages[1]                      function check_sub_questions (never an empty list)
    stages[2]                      ForEach over sub_questions (item: sub_question, collect: facts)
    stages[2].stage.stages[0]        function retrieve         sub_question -> passages
    stages[2].stage.stages[1]        Predict(ExtractFact)      sub_question, passages -> fact
    stages[3]                      Predict / ChainOfThought(Synthesize)  question, facts -> answer
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import dspy

from stageflow.apps.multihop.adapter import make_adapter
from stageflow.apps.multihop.data import corpus_path
from stageflow.apps.multihop.signatures import (
    CompactDecompose,
    CompactExtractFact,
    CompactSynthesize,
    Decompose,
    ExtractFact,
    Synthesize,
)
from stageflow.patterns.foreach import ForEach
from stageflow.patterns.sequential import SequentialPipeline
from stageflow.stages import stage

__all__ = [
    "MAX_SUB_QUESTIONS",
    "MultiHopQA",
    "RetrievePassages",
    "build_program",
    "check_sub_questions",
    "stage_name",
]

#: Sub-questions beyond this many are dropped (the local model's grammar allows at most 4 anyway).
MAX_SUB_QUESTIONS = 4

Retriever = Callable[..., Any]


class RetrievePassages:
    """The retrieve stage's body: ``sub_question -> {"passages": [...]}``.

    Args:
        retriever: Any callable ``(query, k) -> list[str]``, e.g. :class:`stageflow.retrieval.BM25Retriever`.
        k: Passages per sub-question.
    """

    def __init__(self, retriever: Retriever, k: int = 3) -> None:
        self.retriever = retriever
        self.k = k

    def __call__(self, sub_question: str) -> dict[str, list[str]]:
        return {"passages": [str(p) for p in self.retriever(sub_question, self.k)]}

    def __deepcopy__(self, memo: dict[int, Any]) -> RetrievePassages:
        return self  # no learnable state; the index is shared by every copy of the program

    def __repr__(self) -> str:
        return f"RetrievePassages({self.retriever!r}, k={self.k})"


def check_sub_questions(question: str, sub_questions: Any) -> dict[str, list[str]]:
    """Clean the decomposition: strip, drop blanks and repeats, cap the count; never empty.

    Examples:
        >>> check_sub_questions("Who?", [" ", "Who?"])
        {'sub_questions': ['Who?']}
        >>> check_sub_questions("Who wrote Dune?", [])
        {'sub_questions': ['Who wrote Dune?']}
    """
    items = sub_questions if isinstance(sub_questions, list | tuple) else [sub_questions]
    cleaned: list[str] = []
    for item in items:
        text = str(item or "").strip()
        if text and text.lower() not in (c.lower() for c in cleaned):
            cleaned.append(text)
    return {"sub_questions": cleaned[:MAX_SUB_QUESTIONS] or [question]}


class MultiHopQA(SequentialPipeline):
    """The multi-hop QA pipeline (a :class:`SequentialPipeline`); build it with :func:`build_program`.

    ``decompose``, ``extract`` and ``synthesize`` are read-only views of its three predictors (the
    stages themselves live in ``self.stages``, where DSPy's ``named_predictors()`` finds them).
    """

    def __init__(self, stages: list[Any], *, compact: bool = False) -> None:
        super().__init__(stages)
        self.compact = compact

    @property
    def decompose(self) -> dspy.Predict:
        """The decomposition predictor (``stages[0]``)."""
        return self.stages[0]

    @property
    def extract(self) -> dspy.Predict:
        """The per-sub-question fact extractor (``stages[2].stage.stages[1]``)."""
        return self.stages[2].stage.stages[1]

    @property
    def synthesize(self) -> dspy.Module:
        """The final-answer predictor (``stages[3]``)."""
        return self.stages[3]

    def adapter(self) -> dspy.Adapter:
        """The adapter this program's prompt style is meant for (use it in ``dspy.context``)."""
        return make_adapter(self.compact)


def build_program(retriever: Retriever | None = None, k: int = 3, *, compact: bool = False) -> MultiHopQA:
    """Build the multi-hop QA program.

    Args:
        retriever: A callable ``(query, k) -> list[str]``; default: BM25 over the shipped corpus.
        k: Passages retrieved per sub-question.
        compact: Use the terse signatures and a ``Predict`` synthesis (no ``reasoning`` field), meant
            for tiny local models together with :class:`~stageflow.apps.multihop.adapter.CompactJSONAdapter`
            (``program.adapter()``).

    Returns:
        A :class:`MultiHopQA` (a ``SequentialPipeline``). Call it as ``program(question=...)``; the
        result has ``sub_questions``, ``facts``, ``passages`` (one list per sub-question) and ``answer``.
    """
    if retriever is None:
        from stageflow.retrieval import BM25Retriever

        retriever = BM25Retriever(corpus_path(), k=k)
    retrieve = stage(RetrievePassages(retriever, k), writes=["passages"], name="retrieve")
    extract = dspy.Predict(CompactExtractFact if compact else ExtractFact)
    per_question = SequentialPipeline([retrieve, extract])
    synthesize: dspy.Module = dspy.Predict(CompactSynthesize) if compact else dspy.ChainOfThought(Synthesize)
    return MultiHopQA(
        [
            dspy.Predict(CompactDecompose if compact else Decompose),
            stage(check_sub_questions, writes=["sub_questions"]),
            ForEach(
                per_question,
                over="sub_questions",
                item="sub_question",
                collect={"fact": "facts", "passages": "passages"},
            ),
            synthesize,
        ],
        compact=compact,
    )


_NAMES = {
    "stages[0]": "decompose",
    "stages[1]": "check sub-questions",
    "stages[2]": "for each sub-question",
    "stages[2].stage[*]": "  one sub-question",
    "stages[2].stage[*].stages[0]": "    retrieve",
    "stages[2].stage[*].stages[1]": "    extract fact",
    "stages[3]": "synthesize",
}


def stage_name(path: str) -> str:
    """A readable name for a stage path of the program (``stages[2].stage[1].stages[0]`` → retrieve)."""
    key = re.sub(r"stage\[\d+\]", "stage[*]", path)
    return _NAMES.get(key, path)
