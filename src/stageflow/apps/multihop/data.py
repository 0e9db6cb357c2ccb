"""The shipped corpus and question sets, and the answer metric.

``load_devset()`` / ``load_trainset()`` return ``dspy.Example`` objects with ``question`` as the
input and ``answer`` / ``aliases`` (and, for the train set, gold ``sub_questions`` and ``facts``,
which ``BootstrapFewShot`` can use as labeled demos) as labels.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import dspy

from stageflow.errors import ConfigurationError

__all__ = [
    "DATA_DIR",
    "answer_matches",
    "corpus_path",
    "load_devset",
    "load_trainset",
    "match_kind",
    "normalize_text",
    "qa_metric",
]

DATA_DIR = Path(__file__).resolve().parent / "data"
_LABELS = ("answer", "aliases", "sub_questions", "facts", "id", "hops", "supporting_ids")


def corpus_path() -> Path:
    """The shipped corpus (JSON Lines of ``{"id", "title", "text"}``)."""
    return DATA_DIR / "corpus.jsonl"


def _load(name: str) -> list[dspy.Example]:
    path = DATA_DIR / name
    examples: list[dspy.Example] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigurationError(
            f"Cannot read the multi-hop data file {path}: {exc.strerror or exc}.",
            code="missing_data",
            hint="reinstall stageflow; the data files ship inside the package",
        ) from exc
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record: dict[str, Any] = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigurationError(
                f"{path}, line {line_no}: invalid JSON ({exc.msg}).", code="bad_data"
            ) from exc
        fields = {"question": record["question"], **{k: record[k] for k in _LABELS if k in record}}
        examples.append(dspy.Example(**fields).with_inputs("question"))
    return examples


def load_devset() -> list[dspy.Example]:
    """The 30 evaluation questions (24 two-hop, 6 single-hop)."""
    return _load("devset.jsonl")


def load_trainset() -> list[dspy.Example]:
    """The 40 training questions, with gold ``sub_questions`` and ``facts``."""
    return _load("trainset.jsonl")


def normalize_text(text: Any) -> str:
    """Lower-case, strip accents, punctuation and articles, collapse spaces.

    Examples:
        >>> normalize_text("  Málaga, Spain! ")
        'malaga spain'
        >>> normalize_text("The Nile")
        'nile'
    """
    decomposed = unicodedata.normalize("NFKD", str(text))
    ascii_text = "".join(c for c in decomposed if not unicodedata.combining(c)).lower()
    ascii_text = re.sub(r"[^\w\s]", " ", ascii_text)
    ascii_text = re.sub(r"\b(a|an|the)\b", " ", ascii_text)
    return " ".join(ascii_text.split())


def _golds(example: Any) -> list[str]:
    answer = example.get("answer") if hasattr(example, "get") else getattr(example, "answer", None)
    aliases = example.get("aliases") if hasattr(example, "get") else getattr(example, "aliases", None)
    values: Iterable[Any] = [answer, *(aliases or [])]
    return [g for g in (normalize_text(v) for v in values if v is not None) if g]


def _predicted(pred: Any) -> str:
    if isinstance(pred, str):
        return pred
    value = pred.get("answer") if hasattr(pred, "get") else getattr(pred, "answer", None)
    return "" if value is None else str(value)


def match_kind(pred: Any, example: Any) -> Literal["exact", "contains"] | None:
    """How the predicted answer matches the gold answer or an alias, after :func:`normalize_text`.

    ``"exact"`` when equal, ``"contains"`` when a gold answer appears as whole words inside the
    prediction (``"born in Steventon"``), else ``None``.
    """
    got = normalize_text(_predicted(pred))
    if not got:
        return None
    golds = _golds(example)
    if got in golds:
        return "exact"
    padded = f" {got} "
    if any(f" {gold} " in padded for gold in golds):
        return "contains"
    return None


def answer_matches(pred: Any, example: Any) -> bool:
    """``True`` when the prediction (a ``Prediction``, a mapping or a string) matches exactly or contains
    the gold answer or one of its aliases.

    Examples:
        >>> answer_matches("It is Steventon.", {"answer": "Steventon", "aliases": []})
        True
    """
    return match_kind(pred, example) is not None


def qa_metric(example: Any, pred: Any, trace: Any = None) -> bool:
    """:func:`answer_matches` with DSPy's metric signature ``(example, prediction, trace)``."""
    return answer_matches(pred, example)
