"""BM25 retrieval over a JSON Lines corpus, as a plain callable.

``BM25Retriever("corpus.jsonl")("who wrote Dune?")`` returns the best passages as strings
(``"Title: text"``). It is deliberately *not* a ``dspy.Retrieve`` (which breaks ``save()``) nor a
``dspy.Module``: it has no learnable state, and deep copies (which DSPy optimizers make of whole
programs) share the same index.

The index is built once with ``bm25s`` and cached on disk in the user's cache folder (see
:func:`index_cache_dir`: ``$STAGEFLOW_BM25_CACHE_DIR``, else ``$XDG_CACHE_HOME/stageflow/bm25``, else
``~/.cache/stageflow/bm25``), never next to the corpus, which may sit in a read-only or shared place
such as site-packages. Each corpus gets ``<folder>/<hash of its path>/<key>/``, where the key hashes
the corpus bytes and the index settings: an edited corpus gets a fresh index. The cache is written to
a temporary directory and renamed into place, so a reader never sees half an index; if the directory
cannot be written the index simply stays in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from stageflow.errors import ConfigurationError
from stageflow.retrieval.corpus import check_k, format_passage, parse_corpus, read_corpus_bytes

__all__ = ["INDEX_DIR_ENV", "BM25Retriever", "index_cache_dir"]

logger = logging.getLogger(__name__)

INDEX_DIR_ENV = "STAGEFLOW_BM25_CACHE_DIR"
_CACHE_FORMAT = 1
_META_FILE = "stageflow-meta.json"
_TMP_PREFIX = ".tmp-"


class BM25Retriever:
    """Keyword (BM25) search over a JSON Lines corpus of ``{"id", "title", "text"}`` records.

    Args:
        corpus_path: The ``.jsonl`` file. ``text`` is required and non-empty; ``title`` is optional;
            ``id`` (string or integer) defaults to the line number and must be unique.
        k: Default number of passages returned per query.
        stopwords: A ``bm25s`` stopword language code (``"en"``) or ``None`` to keep every word.
        cache: ``False`` never reads or writes the on-disk index.

    Attributes:
        documents: The parsed records, in file order.
        cache_dir: The on-disk index directory in use, or ``None`` when the index lives in memory only.
        loaded_from_cache: ``True`` when the index was read from ``cache_dir`` instead of being built.

    Raises:
        ConfigurationError: the corpus is missing, unreadable, empty or has a bad line (the message
            names the file and line).
    """

    def __init__(
        self,
        corpus_path: str | os.PathLike[str],
        k: int = 3,
        *,
        stopwords: str | None = "en",
        cache: bool = True,
    ) -> None:
        self.k = check_k(k)
        self.corpus_path = Path(corpus_path).expanduser()
        self.stopwords = stopwords
        raw = read_corpus_bytes(self.corpus_path)
        self.documents: list[dict[str, Any]] = parse_corpus(raw, self.corpus_path)
        self.cache_dir: Path | None = None
        self.loaded_from_cache = False
        self._index: Any = None
        self._settings = {
            "format": _CACHE_FORMAT,
            "bm25s": _bm25s_version(),
            "stopwords": stopwords,
            "fields": "title+text",
        }
        key = hashlib.sha256(raw + json.dumps(self._settings, sort_keys=True).encode()).hexdigest()[:20]
        if cache:
            self._index = self._load_cached(key)
        if self._index is None:
            self._index = self._build()
            if cache:
                self._store(key)

    # -- public API -------------------------------------------------------------------------------

    def __call__(self, query: str, k: int | None = None) -> list[str]:
        """Return up to ``k`` passages for ``query``, best first, formatted ``"Title: text"``."""
        return [format_passage(hit) for hit in self.search(query, k)]

    def search(self, query: str, k: int | None = None) -> list[dict[str, Any]]:
        """Return up to ``k`` hits as ``{"id", "title", "text", "score"}`` dicts, best first.

        Only documents sharing at least one (non-stopword) term with the query are returned, so the
        list can be shorter than ``k`` or empty.
        """
        import numpy as np

        limit = self.k if k is None else check_k(k)
        scores = self._scores(query)
        if scores is None:
            return []
        order = np.argsort(-scores, kind="stable")[:limit]
        return [{**self.documents[int(i)], "score": float(scores[i])} for i in order if scores[i] > 0.0]

    def scores(self, query: str) -> list[float]:
        """The BM25 score of every document for ``query``, in :attr:`documents` order (0.0 when a
        document shares no term with the query)."""
        scores = self._scores(query)
        return [0.0] * len(self.documents) if scores is None else [float(x) for x in scores]

    def tokenize(self, text: str) -> list[str]:
        """The index terms of ``text``: lower-cased words, stopwords removed, in order.

        Raises:
            TypeError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return [t for t in self._tokenize([text])[0] if t]

    def _scores(self, query: str) -> Any:
        import numpy as np

        if not isinstance(query, str):
            raise TypeError(f"query must be a str, got {type(query).__name__}")
        tokens = [t for t in self._tokenize([query])[0] if t in self._index.vocab_dict and t]
        if not tokens:
            return None
        return np.asarray(self._index.get_scores(tokens), dtype=np.float64)

    def __len__(self) -> int:
        return len(self.documents)

    def __repr__(self) -> str:
        where = f"cache={str(self.cache_dir)!r}" if self.cache_dir else "in memory"
        return f"BM25Retriever({str(self.corpus_path)!r}, k={self.k}, docs={len(self.documents)}, {where})"

    def __deepcopy__(self, memo: dict[int, Any]) -> BM25Retriever:
        # An index is a read-only resource, not learnable state: copies of a program share it.
        return self

    # -- index building and caching ---------------------------------------------------------------

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        import bm25s

        stopwords: Any = self.stopwords if self.stopwords is not None else []
        tokens: list[list[str]] = bm25s.tokenize(
            texts, stopwords=stopwords, return_ids=False, show_progress=False
        )
        return tokens

    def _build(self) -> Any:
        import bm25s

        texts = [f"{doc['title']} {doc['text']}".strip() for doc in self.documents]
        index = bm25s.BM25()
        index.index(self._tokenize(texts), show_progress=False)
        return index

    def _cache_root(self) -> Path | None:
        where = hashlib.sha256(str(self.corpus_path.resolve()).encode("utf-8", "surrogatepass"))
        try:
            return index_cache_dir() / where.hexdigest()[:16]
        except (RuntimeError, KeyError, OSError) as exc:  # no home folder to cache in
            logger.info("BM25 index for %s kept in memory: no cache folder (%s).", self.corpus_path, exc)
            return None

    def _load_cached(self, key: str) -> Any:
        import bm25s

        root = self._cache_root()
        if root is None:
            return None
        entry = root / key
        meta_path = entry / _META_FILE
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            if meta.get("num_docs") != len(self.documents) or meta.get("settings") != self._settings:
                raise ValueError("cache metadata does not match the corpus")
            index = bm25s.BM25.load(str(entry), load_corpus=False, mmap=False, show_progress=False)
        except Exception as exc:  # a damaged cache is rebuilt, never fatal
            logger.warning("Ignoring the damaged BM25 index cache %s (%s); rebuilding it.", entry, exc)
            shutil.rmtree(entry, ignore_errors=True)
            return None
        self.cache_dir = entry
        self.loaded_from_cache = True
        return index

    def _store(self, key: str) -> None:
        root = self._cache_root()
        if root is None:
            return
        final = root / key
        tmp = root / f"{_TMP_PREFIX}{key}-{uuid.uuid4().hex[:8]}"
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._index.save(str(tmp), show_progress=False)
            meta = {"num_docs": len(self.documents), "settings": self._settings}
            (tmp / _META_FILE).write_text(json.dumps(meta, sort_keys=True), encoding="utf-8")
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / _META_FILE).is_file():
                    raise
                # Another process published the same index first; ours is identical.
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            logger.info(
                "BM25 index for %s kept in memory: cannot write %s (%s).", self.corpus_path, root, exc
            )
            return
        self.cache_dir = final
        self._remove_stale_entries(root, keep=key)

    @staticmethod
    def _remove_stale_entries(root: Path, keep: str) -> None:
        """Drop indexes of older corpus versions, and temp dirs left by crashed builds (after an hour)."""
        with contextlib.suppress(OSError):
            for entry in root.iterdir():
                if not entry.is_dir() or entry.name == keep:
                    continue
                if entry.name.startswith(_TMP_PREFIX) and time.time() - entry.stat().st_mtime < 3600:
                    continue  # possibly another process building right now
                shutil.rmtree(entry, ignore_errors=True)


def index_cache_dir() -> Path:
    """The folder BM25 indexes are cached in.

    ``$STAGEFLOW_BM25_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/stageflow/bm25`` (an absolute
    ``XDG_CACHE_HOME`` only, as the XDG spec says), else ``~/.cache/stageflow/bm25``.
    """
    explicit = os.environ.get(INDEX_DIR_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "stageflow" / "bm25"


def _bm25s_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bm25s")
    except PackageNotFoundError:
        raise ConfigurationError(
            "BM25Retriever needs the 'bm25s' package, which is not installed.",
            code="missing_dependency",
            hint='run `pip install "bm25s==0.3.16"`',
        ) from None
