"""Retrieval over a local JSON Lines corpus, as plain callables (no model, no network).

* :class:`BM25Retriever` — keyword search (``bm25s``), ``retriever(query) -> ["Title: text", ...]``.
* :class:`LinkedRetriever` — two hops over a titled corpus: BM25 for the question, then the passages
  the hits link to by name (entity links), scored for what the question still asks.
* :func:`linked_retrieval_stage` — that as a pipeline stage ``question -> passages, linked``.
* :func:`read_corpus` — check a corpus without indexing it; :func:`index_cache_dir` — where indexes
  are cached (``$STAGEFLOW_BM25_CACHE_DIR``, else the user's cache folder).

Importing this package is cheap: ``bm25s`` and numpy load when a retriever is built.
"""

from __future__ import annotations

from stageflow.retrieval.bm25 import INDEX_DIR_ENV, BM25Retriever, index_cache_dir
from stageflow.retrieval.corpus import format_passage, read_corpus
from stageflow.retrieval.linked import LinkedHit, LinkedRetriever, TitleIndex, linked_retrieval_stage

__all__ = [
    "INDEX_DIR_ENV",
    "BM25Retriever",
    "LinkedHit",
    "LinkedRetriever",
    "TitleIndex",
    "format_passage",
    "index_cache_dir",
    "linked_retrieval_stage",
    "read_corpus",
]
