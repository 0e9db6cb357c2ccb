"""Typed answer candidates: the spans of the retrieved passages that could answer the question.

No model is involved. The question's wording gives the answer type (a year, a number, or a name), and
the candidates are the spans of that type in the passages, in reading order, passages reached by an
entity link first (that is where a two-hop answer lives):

* year: four-digit numbers from 1000 to 2099;
* number: other numbers;
* name: runs of capitalised words, joined by the small words names contain (``of``, ``de``,
  ``van``, ``upon``...), without a leading ``The``/``In``/..., e.g. ``Stratford-upon-Avon``,
  ``Christiaan Huygens``, ``Mount Vesuvius``.

Dropped: names the question already contains, the titles of linked passages (the bridge entity, which
the question asks *about*), and capitalised words right after ``a``/``an`` (``an English novelist``: an
adjective, not an entity).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

__all__ = ["AnswerType", "answer_type", "candidate_spans", "propose_candidates"]

AnswerType = Literal["year", "number", "name"]

#: Candidates passed on to the chooser.
MAX_CANDIDATES = 6

_JOINERS = r"(?:of|de|del|da|di|van|von|der|den|du|la|le|es|upon|y|al|bin)"
_WORD = r"[A-ZÀ-Þ][\w'’.\-]*\w|[A-ZÀ-Þ]"
_NAME = re.compile(rf"(?:{_WORD})(?:\s+(?:{_JOINERS}\s+)*(?:{_WORD}))*")
_LEADING = frozenset(
    {
        "The",
        "A",
        "An",
        "In",
        "On",
        "At",
        "According",
        "After",
        "Before",
        "During",
        "Its",
        "It",
        "He",
        "She",
        "They",
        "His",
        "Her",
        "Their",
        "This",
        "That",
        "These",
        "Those",
        "From",
        "By",
        "With",
        "As",
        "When",
        "While",
        "Today",
        "Although",
        "Since",
        "Later",
        "Both",
        "Each",
        "Some",
        "Most",
    }
)
_YEAR = re.compile(r"(?<![\d,.])(1\d{3}|20\d{2})(?!\d|[.,]\d)")
_NUMBER = re.compile(r"(?<![\w,.])\d+(?:[.,]\d+)*(?!\w)")
_ARTICLE_BEFORE = re.compile(r"\b(?:a|an)\s+$")
_WORDS = re.compile(r"\w+")


def answer_type(question: str) -> AnswerType:
    """What kind of answer the question asks for.

    Examples:
        >>> answer_type("In what year did the Berlin Wall fall?")
        'year'
        >>> answer_type("How many bones are in the adult human skeleton?")
        'number'
        >>> answer_type("In which town was the author of Hamlet born?")
        'name'
    """
    text = question.lower()
    if re.search(r"\b(?:what|which) year\b|^\s*when\b", text):
        return "year"
    if re.search(r"\bhow (?:many|much|long|tall|high|old|far|deep)\b", text):
        return "number"
    return "name"


def _names(text: str) -> list[str]:
    spans: list[str] = []
    for match in _NAME.finditer(text):
        words = match.group(0).split()
        while words and words[0] in _LEADING:
            words.pop(0)
        if not words:
            continue
        start = match.start() + match.group(0).index(words[0])
        if len(words) == 1 and _ARTICLE_BEFORE.search(text[:start]):
            continue  # "an English novelist": an adjective
        span = " ".join(words).rstrip(".'’")
        if len(span) > 1:  # not an initial ("J. K. Rowling" gives "Rowling")
            spans.append(span)
    return spans


def _passage_text(passage: str) -> str:
    """The text of a ``"Title: text"`` passage (its title is the subject, not a candidate span)."""
    head, sep, rest = passage.partition(": ")
    return rest if sep and len(head) < 80 else passage


def candidate_spans(
    question: str,
    passages: Iterable[str],
    *,
    exclude: Iterable[str] = (),
    limit: int = MAX_CANDIDATES,
) -> list[str]:
    """Spans of the passages that have the answer type of ``question``, in order, without repeats.

    Args:
        question: The question.
        passages: Passages in the order to read them (``"Title: text"`` or plain text).
        exclude: Spans never to propose (compared case-insensitively), e.g. bridge entities.
        limit: At most this many candidates.

    Examples:
        >>> candidate_spans("In which village was the author of Emma born?",
        ...                 ["Jane Austen: Jane Austen was an English novelist born in Steventon."],
        ...                 exclude=["Jane Austen"])
        ['Steventon']
    """
    kind = answer_type(question)
    asked = {w.lower() for w in _WORDS.findall(question)}
    seen = {e.strip().lower() for e in exclude}
    found: list[str] = []
    for passage in passages:
        text = _passage_text(str(passage))
        if kind == "year":
            spans = _YEAR.findall(text)
        elif kind == "number":
            spans = _NUMBER.findall(text)
        else:
            spans = [s for s in _names(text) if not all(w.lower() in asked for w in _WORDS.findall(s))]
        for span in spans:
            if span.lower() not in seen:
                seen.add(span.lower())
                found.append(span)
                if len(found) >= limit:
                    return found
    return found


def _title(passage: str) -> str:
    head, sep, _ = passage.partition(": ")
    return head if sep else ""


def propose_candidates(
    question: str, passages: Sequence[str], linked: Sequence[str] = ()
) -> dict[str, list[str]]:
    """The candidates stage: ``question, passages, linked -> candidates``.

    Passages whose title is in ``linked`` (reached by an entity link) are read first; linked titles
    themselves are never candidates.
    """
    linked_set = set(linked)
    ordered = [p for p in passages if _title(p) in linked_set] + [
        p for p in passages if _title(p) not in linked_set
    ]
    return {"candidates": candidate_spans(question, ordered, exclude=linked)}
