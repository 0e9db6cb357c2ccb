"""Typed answer candidates: the spans of the retrieved passages that could answer the question.

No model is involved. The question's wording gives the answer type (a year, a number, a person or
another name), and the candidates are the spans of that type in the passages, in reading order,
passages reached by an entity link first (that is where a two-hop answer lives):

* year: four-digit numbers from 1000 to 2099;
* number: other numbers;
* person ("Who ...?", "Which philosopher ...?"): the people the passages name, people with evidence
  first (see :mod:`stageflow.apps.multihop.people`): ``Leonardo da Vinci``, not ``Italian
  Renaissance``;
* name: runs of capitalised words, joined by the small words names contain (``of``, ``de``,
  ``van``, ``upon``...), without a leading ``The``/``In``/..., e.g. ``Stratford-upon-Avon``,
  ``Christiaan Huygens``, ``Mount Vesuvius``.

Dropped: names the question already contains, capitalised words right after ``a``/``an`` (``an
English novelist``: an adjective, not an entity) and, except for a person question, the titles of
linked passages (the bridge entity, which the question asks *about*; "Who painted the Mona Lisa?"
asks for the linked person itself).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Literal

from stageflow.apps.multihop.people import PERSON_ROLES, is_person_passage, person_candidates
from stageflow.apps.multihop.spans import name_spans

__all__ = ["AnswerType", "answer_type", "candidate_spans", "propose_candidates"]

AnswerType = Literal["year", "number", "person", "name"]

#: Candidates passed on to the chooser.
MAX_CANDIDATES = 6

_YEAR = re.compile(r"(?<![\d,.])(1\d{3}|20\d{2})(?!\d|[.,]\d)")
_NUMBER = re.compile(r"(?<![\w,.])\d+(?:[.,]\d+)*(?!\w)")
_WORDS = re.compile(r"\w+")
_WHO = re.compile(r"^\s*(?:(?:to|by|with|for|from|of|about)\s+)?(?:who|whom|whose)\b")
_CLAUSE = re.compile(r"\s(?:who|whom|whose|that|which|where)\b", re.IGNORECASE)
_AS_NAME = "What?"  # a question of the plain name type
_VERBS = r"(?:is|was|are|were|did|does|do|has|had|the|a|an)\b"
_WHICH_PERSON = re.compile(
    rf"^\s*(?:(?:in|to|by|for|from|with|of)\s+)?(?:which|what)\s+(?:(?!{_VERBS})[\w-]+\s+)?"
    rf"(?:{'|'.join(sorted(PERSON_ROLES))})s?\b"
)


def answer_type(question: str) -> AnswerType:
    """What kind of answer the question asks for.

    Examples:
        >>> answer_type("In what year did the Berlin Wall fall?")
        'year'
        >>> answer_type("How many bones are in the adult human skeleton?")
        'number'
        >>> answer_type("Who painted the Mona Lisa?")
        'person'
        >>> answer_type("Which philosopher tutored Alexander the Great?")
        'person'
        >>> answer_type("In which town was the author of Hamlet born?")
        'name'
    """
    text = question.lower()
    if re.search(r"\b(?:what|which) year\b|^\s*when\b", text):
        return "year"
    if re.search(r"\bhow (?:many|much|long|tall|high|old|far|deep)\b", text):
        return "number"
    if _WHO.search(text) or _WHICH_PERSON.search(text):
        return "person"
    return "name"


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
    passages = [str(p) for p in passages]
    if kind == "person":
        people = person_candidates(passages, asked=asked, exclude=exclude, limit=limit)
        if people:
            return people
        kind = "name"  # no person found: any name beats no candidate at all
    seen = {e.strip().lower() for e in exclude}
    found: list[str] = []
    for passage in passages:
        text = _passage_text(passage)
        if kind == "year":
            spans = _YEAR.findall(text)
        elif kind == "number":
            spans = _NUMBER.findall(text)
        else:
            names = [s.text for s in name_spans(text)]
            spans = [s for s in names if not all(w.lower() in asked for w in _WORDS.findall(s))]
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
    themselves are candidates only when the question asks for a person ("Who painted the Mona
    Lisa?" links to the painter's passage and asks for that very name).
    """
    linked_set = set(linked)
    ordered = [p for p in passages if _title(p) in linked_set] + [
        p for p in passages if _title(p) not in linked_set
    ]
    if answer_type(question) == "person":
        return {"candidates": _people(question, passages, linked_set)}
    return {"candidates": candidate_spans(question, ordered, exclude=linked)}


def _people(question: str, passages: Sequence[str], linked: set[str]) -> list[str]:
    """Person candidates, read one retrieval chain (a hop-1 passage and the passage it links to) at a
    time, chains from passages the question names first ("... wrote *The Hobbit*?").

    A question that describes someone through a clause ("the philosopher *who wrote* The Republic")
    goes through a person: the linked passage is read first, and the people with a passage of their
    own (the described one) come after the people those passages mention. Otherwise ("Who painted
    the Mona Lisa?") the linked person may well be the answer.
    """
    chains: list[list[str]] = []
    for passage in passages:
        if _title(passage) in linked and chains:
            chains[-1].append(passage)
        else:
            chains.append([passage])
    chains.sort(key=lambda chain: not _names_title(question, _title(chain[0])))
    two_hop = bool(_CLAUSE.search(question))
    ordered = [p for chain in chains for p in (chain[::-1] if two_hop else chain)]
    asked = {w.lower() for w in _WORDS.findall(question)}
    bridges = {_title(p) for p in passages if is_person_passage(p)} | linked if two_hop else set()
    people = person_candidates(ordered, asked=asked, bridges=bridges, limit=MAX_CANDIDATES)
    return people or candidate_spans(_AS_NAME, passages, exclude=linked)


def _names_title(question: str, title: str) -> bool:
    bare = re.sub(r"\s*\([^)]*\)\s*$", "", title).strip()
    return bool(bare) and re.search(rf"(?<!\w){re.escape(bare)}(?!\w)", question, re.IGNORECASE) is not None
