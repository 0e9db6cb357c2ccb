"""The DSPy signatures of the multi-hop QA program, in two prompt styles.

The *standard* signatures carry short, clear instructions and field descriptions and suit any model.
The *compact* ones are for tiny local models (SmolLM2-135M), used with
:class:`~stageflow.apps.multihop.adapter.CompactJSONAdapter`: one terse imperative line each, no
field descriptions, and the synthesis is a plain ``Predict`` (no ``reasoning`` output), so prompts and
constrained outputs stay short.

``ChooseAnswer`` and ``ReadAnswer`` answer from retrieved passages in one call (the linked
architectures of :mod:`stageflow.apps.multihop.linked`): the first picks one of the candidate spans,
the second writes the answer freely.
"""

from __future__ import annotations

import dspy

__all__ = [
    "ChooseAnswer",
    "CompactDecompose",
    "CompactExtractFact",
    "CompactSynthesize",
    "Decompose",
    "ExtractFact",
    "ReadAnswer",
    "Synthesize",
]


class Decompose(dspy.Signature):  # type: ignore[misc]
    """Split the question into the simple questions that must be answered first, in order.

    Use one question per fact to look up, usually one or two. Keep each one short and self-contained.
    """

    question: str = dspy.InputField()
    sub_questions: list[str] = dspy.OutputField(
        desc="one to three short questions, in the order to answer them"
    )


class ExtractFact(dspy.Signature):  # type: ignore[misc]
    """Read the passages and state the fact that answers the sub-question, in one short sentence.

    Copy names, places and numbers exactly as the passages write them.
    """

    sub_question: str = dspy.InputField()
    passages: list[str] = dspy.InputField(desc="retrieved passages, best match first")
    fact: str = dspy.OutputField(desc="one sentence taken from the passages")


class Synthesize(dspy.Signature):  # type: ignore[misc]
    """Answer the question using the facts. Give only the answer: a name, place, number or date."""

    question: str = dspy.InputField()
    facts: list[str] = dspy.InputField(desc="facts found for the sub-questions")
    answer: str = dspy.OutputField(desc="a few words, no full sentence")


class CompactDecompose(dspy.Signature):  # type: ignore[misc]
    """List the simple questions needed to answer the question."""

    question: str = dspy.InputField()
    sub_questions: list[str] = dspy.OutputField()


class CompactExtractFact(dspy.Signature):  # type: ignore[misc]
    """Answer the sub-question with one sentence from the passages."""

    sub_question: str = dspy.InputField()
    passages: list[str] = dspy.InputField()
    fact: str = dspy.OutputField()


class CompactSynthesize(dspy.Signature):  # type: ignore[misc]
    """Answer the question with a short name, place, number or date, using the facts."""

    question: str = dspy.InputField()
    facts: list[str] = dspy.InputField()
    answer: str = dspy.OutputField()


class ChooseAnswer(dspy.Signature):  # type: ignore[misc]
    """Answer the question with one of the candidates, using the passages."""

    question: str = dspy.InputField()
    passages: list[str] = dspy.InputField()
    candidates: list[str] = dspy.InputField()
    answer: str = dspy.OutputField()


class ReadAnswer(dspy.Signature):  # type: ignore[misc]
    """Answer the question with a short name, place, number or date, using the passages."""

    question: str = dspy.InputField()
    passages: list[str] = dspy.InputField()
    answer: str = dspy.OutputField()
