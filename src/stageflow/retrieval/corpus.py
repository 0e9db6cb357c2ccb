"""Titled corpora in JSON Lines: reading, validating and formatting passages.

A corpus file has one ``{"id", "title", "text"}`` object per line: ``text`` is required and non-empty,
``title`` is optional, ``id`` (string or integer) defaults to the line number and must be unique.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from stageflow.errors import ConfigurationError

__all__ = ["check_k", "format_passage", "parse_corpus", "read_corpus", "read_corpus_bytes"]


def check_k(k: Any) -> int:
    """``k`` if it is a positive int.

    Raises:
        ConfigurationError: anything else.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigurationError(
            f"k must be a positive integer, got {k!r}.", field="k", code="bad_argument", hint="pass e.g. k=3"
        )
    return k


def format_passage(hit: dict[str, Any]) -> str:
    """A passage as retrievers return it: ``"Title: text"`` (just the text when untitled).

    Examples:
        >>> format_passage({"title": "Dune", "text": "A novel."})
        'Dune: A novel.'
    """
    return f"{hit['title']}: {hit['text']}" if hit["title"] else str(hit["text"])


def read_corpus_bytes(path: Path) -> bytes:
    """The raw bytes of a corpus file.

    Raises:
        ConfigurationError: the file is missing or unreadable.
    """
    if not path.is_file():
        raise ConfigurationError(
            f"Corpus file not found: {path}.",
            field="corpus_path",
            code="corpus_not_found",
            hint='pass the path of a JSON Lines file with one {"id", "title", "text"} object per line',
        )
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"Corpus file {path} cannot be read: {exc.strerror or exc}.",
            field="corpus_path",
            code="corpus_unreadable",
            hint="check the file's permissions",
        ) from exc


def parse_corpus(raw: bytes, path: Path) -> list[dict[str, Any]]:
    """The documents of a corpus file, in file order, as ``{"id", "title", "text"}`` dicts.

    Raises:
        ConfigurationError: a line is not a valid record, or the file has none; the message names
            the file and line.
    """

    def bad(line_no: int, problem: str) -> ConfigurationError:
        return ConfigurationError(
            f"Corpus file {path}, line {line_no}: {problem}.",
            field="corpus_path",
            code="bad_corpus_line",
            hint='make every non-blank line a JSON object like {"id": "d1", "title": "...", "text": "..."}',
        )

    try:
        content = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = raw[: exc.start].count(b"\n") + 1
        raise bad(line_no, "not valid UTF-8") from exc

    documents: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for line_no, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise bad(line_no, f"invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise bad(line_no, f"expected a JSON object, got {type(record).__name__}")
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise bad(line_no, "'text' must be a non-empty string")
        title = record.get("title", "")
        if title is None:
            title = ""
        if not isinstance(title, str):
            raise bad(line_no, "'title' must be a string")
        doc_id = record.get("id", str(line_no))
        if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
            raise bad(line_no, "'id' must be a string or an integer")
        if str(doc_id) in seen:
            raise bad(line_no, f"duplicate id {doc_id!r} (first used on line {seen[str(doc_id)]})")
        seen[str(doc_id)] = line_no
        documents.append({"id": doc_id, "title": title.strip(), "text": text.strip()})
    if not documents:
        raise ConfigurationError(
            f"Corpus file {path} contains no documents.",
            field="corpus_path",
            code="empty_corpus",
            hint='add at least one line like {"id": "d1", "title": "...", "text": "..."}',
        )
    return documents


def read_corpus(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read and check a JSON Lines corpus without indexing it (no ``bm25s`` needed).

    Raises:
        ConfigurationError: as :class:`~stageflow.retrieval.BM25Retriever` does for a missing,
            unreadable or bad corpus.
    """
    corpus = Path(path).expanduser()
    return parse_corpus(read_corpus_bytes(corpus), corpus)
