"""Person candidates for "Who ...?" questions: the spans of the passages that name people.

What a person looks like in a titled corpus (checked on the shipped one, where 97 of 314 passages
are about a person, one of them fictional):

* a person passage opens with its subject, a copula and a role: "Leonardo da Vinci was an Italian
  Renaissance *painter*", "Plato was an ancient Greek *philosopher*", "Usain Bolt is a *sprinter*";
  84 of them say "born" in that first sentence;
* other passages mention a person as the agent after ``by`` ("painted by Leonardo da Vinci"), after a
  role ("the Dutch astronomer Christiaan Huygens", "the philosopher Aristotle"), after a relation ("a
  student of Socrates"), or next to such a mention ("Marie Curie and Pierre Curie").

Not people: names holding a word of periods, movements, places, buildings, bodies or awards
("Italian Renaissance", "Dutch Golden Age", "Tower of London", "Nobel Prize"), names opening with a
nationality or a compass word ("Dutch Post-Impressionist", "East Africa"), and the titles of passages
that are not about a person ("Louvre"). A single word is a person only when a cue or a person passage
says so (``Vinci`` is a town).

:func:`person_candidates` proposes the people known from their own passage or mentioned with a cue,
in reading order, and names that only look like a person's only when there are none (they are
mostly titles of works: "Water Music", "Animal Farm").
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from stageflow.apps.multihop.spans import NameSpan, name_spans

__all__ = ["PERSON_ROLES", "is_person_passage", "person_candidates"]


def _word_set(words: str) -> frozenset[str]:
    return frozenset(words.split())


#: Nouns that name what a person is or does (lowercase, singular).
PERSON_ROLES = _word_set(
    "actor actress architect artist astronaut astronomer athlete author aviator biologist businessman "
    "captain chemist clergyman commander composer cosmonaut dancer detective diplomat director doctor "
    "dramatist economist emperor empress engineer entrepreneur explorer footballer founder general "
    "goldsmith historian inventor journalist king leader mathematician merchant microbiologist monk "
    "mountaineer musician naturalist navigator novelist painter pharaoh philosopher physician physicist "
    "pianist pilot player playwright poet politician pope president priest prince princess printer "
    "professor queen ruler sailor saint scientist sculptor singer soldier songwriter sprinter statesman "
    "student surgeon teacher tsar violinist warrior writer"
)
_RELATIONS = (
    "student|pupil|teacher|tutor|son|daughter|wife|husband|father|mother|brother|sister|friend|"
    "disciple|apprentice|assistant|successor|rival|partner|colleague|heir|widow"
)
#: Words that make a name something other than a person.
_NOT_PERSON = _word_set(
    "Abbey Academy Age Ages Airport Award Basilica Battle Bay Bridge Canal Castle Cathedral Century "
    "Championships Chapel Church City Coast College Company Concerto Contest Council County Cup Desert "
    "Dynasty Empire Engine Era Falls Festival Forest Gallery Games Gulf Hall Harbor Harbour Heritage "
    "Hospital House Institute Island Islands Kingdom Lake Library Lighthouse Medal Mount Mountains "
    "Museum Ocean Olympics Opera Overture Palace Park Peninsula Period Prize Prizes Province Region "
    "Renaissance Republic Revolution River School Sea Site Society Spot Square State States Station "
    "Strait Street Symphony System Telescope Temple Tower Town Union University Valley Village Wall "
    "War World Africa America Americas Asia Europe Oceania Antarctica Earth Sun Moon"
)
#: Words that open a name of a place, a people or a style rather than a person's name.
_NOT_FIRST = _word_set(
    "North South East West Northern Southern Eastern Western Central Middle Upper Lower Greater New "
    "Ancient American British English Scottish Welsh Irish French German Dutch Flemish Belgian Swiss "
    "Austrian Italian Spanish Portuguese Greek Roman Russian Soviet Polish Czech Hungarian Swedish "
    "Norwegian Danish Finnish Icelandic Chinese Japanese Korean Indian Pakistani Egyptian African "
    "European Asian Arab Persian Turkish Mexican Brazilian Argentine Colombian Peruvian Canadian "
    "Australian Nigerian Ethiopian Jamaican Cuban Latin Norse Celtic Ottoman Byzantine Mughal "
    "Victorian Gothic Baroque Catholic Protestant Islamic Jewish"
)
_ROLE_WORDS = "|".join(sorted(PERSON_ROLES))
_ROLE_BEFORE = re.compile(rf"\b(?:{_ROLE_WORDS})\s+$")
_AGENT_BEFORE = re.compile(r"\bby\s+$")
_RELATION_BEFORE = re.compile(rf"\b(?:{_RELATIONS})\s+of\s+$")
_SENTENCE_END = re.compile(r"(?<=\w\w[.!?])\s+(?=[A-Z])")  # not after an initial ("J. R. R.")
_THE_BEFORE = re.compile(r"\b[Tt]he\s+$")
_BETWEEN_PEOPLE = re.compile(r"^(?:\s*,\s*|\s+and\s+|\s*,\s+and\s+)$")
_COPULA_ROLE = re.compile(r"^[^.]*?\b(?:was|is|were)\s+(?:a|an|the)\s+([^.,;]*)")
_NP_END = re.compile(r"\b(?:of|from|who|which|that|born|in|on|at|with|for|by|to)\b")
_WORDS = re.compile(r"[\w'’-]+")
_POSSESSIVE = re.compile(r"['’]s$")


def _split(passage: str) -> tuple[str, str]:
    head, sep, rest = passage.partition(": ")
    return (head, rest) if sep and len(head) < 80 else ("", passage)


def is_person_passage(passage: str) -> bool:
    """Whether a ``"Title: text"`` passage is about a person: its first sentence says ``born``, or
    calls its subject a role ("was an Italian Renaissance painter").

    Examples:
        >>> is_person_passage("Plato: Plato was an ancient Greek philosopher from Athens.")
        True
        >>> is_person_passage("Mona Lisa: The Mona Lisa is a portrait painted by Leonardo da Vinci.")
        False
    """
    first = _SENTENCE_END.split(_split(passage)[1], maxsplit=1)[0]
    if re.search(r"\bborn\b", first):
        return True
    copula = _COPULA_ROLE.match(first)
    if copula is None:
        return False
    phrase = _NP_END.split(copula.group(1), maxsplit=1)[0]
    return any(w.lower() in PERSON_ROLES for w in _WORDS.findall(phrase))


def _bare(title: str) -> str:
    return re.sub(r"\s*\([^)]*\)\s*$", "", title).strip()


def _looks_like_a_person(name: str) -> bool:
    words = name.split()
    if words[0] in _NOT_FIRST or any(w in _NOT_PERSON for w in words):
        return False
    return not any(len(w) > 5 and (w.endswith(("ism", "ist"))) for w in words)  # movements


class _Known:
    """The passages' titles: which name people and which do not."""

    def __init__(self, passages: Sequence[str]) -> None:
        self.people: list[str] = []
        self.others: set[str] = set()
        for passage in passages:
            title = _bare(_split(passage)[0])
            if title:
                (self.people.append if is_person_passage(passage) else self.others.add)(title)

    def person(self, name: str, subject: str = "") -> str | None:
        """The person title ``name`` refers to: the title itself, a longer form of it ("Rembrandt van
        Rijn" for "Rembrandt"), a surname only one title has ("Tolkien"), or a part of the passage's
        own subject."""
        words = name.split()
        for title in self.people:
            have = title.split()
            if name == title or (words[0] == have[0] and set(have) <= set(words)):
                return title
        if len(words) == 1:
            owners = [t for t in self.people if t.split()[-1] == name]
            if len(owners) == 1:
                return owners[0]
        if subject and subject in self.people and set(words) < set(subject.split()):
            return subject
        return None

    def thing(self, name: str) -> bool:
        """Whether ``name`` is the title of a passage that is not about a person."""
        return name in self.others or f"The {name}" in self.others


#: Cues before a name: none, the agent "by" (a country can follow it too), a role or a relation.
_NO_CUE, _AGENT, _ROLE = 0, 1, 2


def _mentions(text: str) -> list[tuple[NameSpan, int]]:
    """The names of ``text`` that may be people, each with its cue; a name next to a cued one
    ("Marie Curie and Pierre Curie") shares its cue. Names right after "the" are things ("the Night
    Watch"), unless a role stands between ("the philosopher Aristotle")."""
    out: list[tuple[NameSpan, int]] = []
    for span in name_spans(text):
        before = text[: span.start]
        cue = _NO_CUE
        if _ROLE_BEFORE.search(before) or _RELATION_BEFORE.search(before):
            cue = _ROLE
        elif _THE_BEFORE.search(before):
            continue
        elif _AGENT_BEFORE.search(before):
            cue = _AGENT
        elif out and out[-1][1] and _BETWEEN_PEOPLE.match(text[out[-1][0].end : span.start]):
            cue = out[-1][1]
        out.append((span, cue))
    return out


def person_candidates(
    passages: Sequence[str],
    *,
    asked: Iterable[str] = (),
    exclude: Iterable[str] = (),
    bridges: Iterable[str] = (),
    limit: int = 6,
) -> list[str]:
    """The people the passages name, in reading order: people known from their own passage or
    mentioned with a cue; when there are none, names that only look like a person's.

    Args:
        passages: ``"Title: text"`` passages in the order to read them.
        asked: The question's words (lowercase): names made only of them are not proposed.
        exclude: Names never to propose (compared case-insensitively).
        bridges: Names to propose after every other evidenced person (the people a two-hop question
            goes *through*).
        limit: At most this many.

    Examples:
        >>> person_candidates([
        ...     "Mona Lisa: The Mona Lisa is a portrait painted by Leonardo da Vinci and shown in Paris.",
        ...     "Leonardo da Vinci: Leonardo da Vinci was an Italian Renaissance painter born near Vinci.",
        ... ], asked={"who", "painted", "the", "mona", "lisa"})
        ['Leonardo da Vinci']
    """
    known = _Known(passages)
    asked_words = set(asked)
    banned = {e.strip().lower() for e in exclude}
    later = set(bridges)
    ranked: dict[str, tuple[bool, bool, int, int]] = {}

    def offer(name: str, evidence: bool, where: tuple[int, int]) -> None:
        if name.lower() in banned or all(w.lower() in asked_words for w in _WORDS.findall(name)):
            return
        key = (not evidence, name in later, *where)
        if name not in ranked or key < ranked[name]:
            ranked[name] = key

    for index, passage in enumerate(passages):
        title, text = _split(passage)
        subject = _bare(title)
        if subject in known.people:
            offer(subject, True, (index, -1))  # a person passage names its subject first
        for span, cue in _mentions(text):
            name = _POSSESSIVE.sub("", span.text)
            if known.thing(name):
                continue
            person = known.person(name, subject)
            if person is not None:
                offer(person, True, (index, span.start))
            elif not _looks_like_a_person(name):
                continue
            elif cue == _ROLE or (cue == _AGENT and " " in name):
                offer(name, True, (index, span.start))
            elif cue == _AGENT or " " in name:
                offer(name, False, (index, span.start))
    people = sorted(ranked, key=ranked.__getitem__)
    evidenced = [p for p in people if not ranked[p][0]]
    return (evidenced or people)[:limit]  # a name's shape alone only when nothing better was found
