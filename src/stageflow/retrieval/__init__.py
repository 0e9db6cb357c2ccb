"""Retrieval over a local JSON Lines corpus, as plain callables (no model, no network).

* :class:`BM25Retriever` — keyword search (``bm25s``), ``retriever(query) -> ["Title: text", ...]``.
* :class:`LinkedRetriever` — two hops over a titled corpus: BM25 for the question, then the passages
  the hits link to by name (entity links), scored for what the question still asks.
* :func:`linked_retrieval_stage` — that as a pipeline stage ``question -> passages, linked``.

Importing this package is cheap: ``bm25s`` and numpy load when a retriever is built.
"""

from __future__ import annotations

from stageflow.retrieval.bm25 import BM25Retriever
from stageflow.retrieval.corpus import format_passage
from stageflow.retrieval.linked import LinkedHit, LinkedRetriever, TitleIndex, linked_retrieval_stage

__all__ = [
    "BM25Retriever",
    "LinkedHit",
    "LinkedRetriever",
    "TitleIndex",
    "format_passage",
    "linked_retrieval_stage",
]
