"""Capitalised name spans of a text, with where they start (shared by the candidate typers).

A name is a run of capitalised words joined by the small words names contain (``of``, ``de``,
``van``, ``upon``...), without a leading ``The``/``In``/... and not a lone capitalised word right after
``a``/``an`` (``an English novelist``: an adjective, not an entity).
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["NameSpan", "name_spans"]

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
_ARTICLE_BEFORE = re.compile(r"\b(?:a|an)\s+$")


class NameSpan(NamedTuple):
    """A name in a text: its words as written and where it starts and ends."""

    text: str
    start: int
    end: int


def name_spans(text: str) -> list[NameSpan]:
    """The names in ``text``, in order.

    Examples:
        >>> [s.text for s in name_spans("The novels of Jane Austen, an English writer, are read in Bath.")]
        ['Jane Austen', 'Bath']
    """
    spans: list[NameSpan] = []
    for match in _NAME.finditer(text):
        words = match.group(0).split()
        while words and words[0] in _LEADING:
            words.pop(0)
        if not words:
            continue
        start = match.start() + match.group(0).index(words[0])
        if len(words) == 1 and _ARTICLE_BEFORE.search(text[:start]):
            continue  # "an English novelist": an adjective
        written = text[start : match.end()].rstrip(".'’")
        span = " ".join(written.split())
        if len(span) > 1:  # not an initial ("J. K. Rowling" gives "Rowling")
            spans.append(NameSpan(span, start, start + len(written)))
    return spans
