"""Persistent cache stores.

:class:`SQLiteStore` keeps stage outputs in one SQLite file (stdlib, no server), as text in the
format of :mod:`stageflow.policies.codec` — never a pickle, so reading a file cannot run code.

- **Reads** go to the database on a memory miss. A file that is not a stageflow cache (not
  SQLite, another program's tables, a damaged or truncated file, a directory, no permission) is
  never modified and never fails a stage: the store turns itself off with one
  :class:`~stageflow.policies.cache.CacheWarning` and the stage is cached in memory only. An entry
  that cannot be decoded is a miss (one warning).
- **Writes** are queued and committed by a background thread in batches (WAL,
  ``synchronous=NORMAL``), so a miss does not wait for the disk. The queue is bounded
  (``max_pending``): when it is full, the producer waits for the writer. A write delayed by a
  lock (another process writing) is retried with backoff for up to ``lock_timeout`` seconds; what
  still fails is counted (``stats()["lost_writes"]``) and reported with a warning — never dropped
  silently.
- **Exit**: pending writes are flushed at normal interpreter exit and on SIGTERM (a handler that
  flushes, then runs the handler that was installed before it, or the default action). Worst case
  after a SIGKILL: the writes queued since the last commit — those of the last ~50 ms batch window,
  and never more than ``max_pending`` (measured in BENCHMARKS.md). See
  :mod:`~stageflow.policies.write_queue`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stageflow.errors import ConfigurationError
from stageflow.policies import codec
from stageflow.policies.write_queue import WriteQueue, is_lock_error

__all__ = ["SQLiteStore"]

_BUSY_TIMEOUT = 0.1  # SQLite's own wait on a lock, per attempt; the retry loop does the rest
_TABLE, _META = "stageflow_cache", "stageflow_meta"
_SCHEMA = (
    f"CREATE TABLE IF NOT EXISTS {_TABLE} (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {_META} (name TEXT PRIMARY KEY, setting TEXT NOT NULL)",
    f"INSERT OR IGNORE INTO {_META} (name, setting) VALUES ('format', '{codec.FORMAT}')",
)


class _Unusable(Exception):  # noqa: N818 - a signal inside this module
    """The file is not a stageflow cache we may use."""


def _warn(message: str) -> None:
    from stageflow.policies.cache import CacheWarning

    warnings.warn(message, CacheWarning, stacklevel=3)


class SQLiteStore:
    """A persistent key → value store in one SQLite file, with background writes.

    Args:
        path: The database file (created with its folder if missing).
        lock_timeout: Seconds a write keeps retrying while another connection holds the lock.
        max_pending: Writes queued at most; a full queue makes the producer wait.
        types: Classes (pydantic models, dataclasses, enums) this store may decode before this
            process has encoded one (see :func:`stageflow.policies.codec.allow`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        lock_timeout: float = 30.0,
        max_pending: int = 1024,
        types: Sequence[type] = (),
    ) -> None:
        if not isinstance(path, str | os.PathLike):
            raise ConfigurationError(
                f"SQLiteStore needs a file path, got {path!r}.", field="path", code="bad_cache_path"
            )
        if not (isinstance(lock_timeout, int | float) and lock_timeout >= 0):
            raise ConfigurationError(
                f"lock_timeout must be seconds >= 0, got {lock_timeout!r}.", field="lock_timeout"
            )
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ConfigurationError(
                f"max_pending must be an int >= 1, got {max_pending!r}.", field="max_pending"
            )
        self.path = Path(path)
        self.lock_timeout = float(lock_timeout)
        self.max_pending = max_pending
        self._types = tuple(types)
        self._allowed = {f"{c.__module__}:{c.__qualname__}": c for c in self._types}
        self._queue: WriteQueue | None = None
        self._read: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self.hits = self.misses = 0
        self.bad_entries = self.unknown_types = 0
        self._warned: set[str] = set()
        self.error: str | None = None
        self._open()

    # -- opening -----------------------------------------------------------------------------------

    def allow_types(self, types: Sequence[type]) -> None:
        """Also decode entries of ``types`` (the classes a stage declares it returns)."""
        self._types = (*self._types, *(t for t in types if t not in self._types))
        self._allowed.update({f"{c.__module__}:{c.__qualname__}": c for c in types})

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=min(_BUSY_TIMEOUT, self.lock_timeout), check_same_thread=False
        )
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes, no fsync per commit
        return conn

    def _open(self) -> None:
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                self._read = self._open_once()
                insert = f"INSERT OR REPLACE INTO {_TABLE} (key, value) VALUES (?, ?)"
                self._queue = WriteQueue(self._connect, insert, self.lock_timeout, self.max_pending)
                return
            except sqlite3.OperationalError as e:
                if is_lock_error(e) and time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                self._unusable(str(e))
            except (sqlite3.Error, OSError, _Unusable) as e:
                self._unusable(str(e) or type(e).__name__)
            return

    def _open_once(self) -> sqlite3.Connection:
        if self.path.is_dir():
            raise _Unusable("it is a directory")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect()
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                conn.execute("PRAGMA journal_mode=WAL")
                with conn:
                    for statement in _SCHEMA:
                        conn.execute(statement)
            elif {_TABLE, _META} <= tables:
                row = conn.execute(f"SELECT setting FROM {_META} WHERE name = 'format'").fetchone()
                if row is None or row[0] != str(codec.FORMAT):
                    raise _Unusable(f"it is a stageflow cache in another format ({row and row[0]!r})")
                conn.execute(f"SELECT key, value FROM {_TABLE} LIMIT 1").fetchall()
                conn.execute("PRAGMA journal_mode=WAL")
            else:
                raise _Unusable(
                    f"it holds other tables ({', '.join(sorted(tables)[:4])}), not a stageflow cache"
                )
        except BaseException:
            conn.close()
            raise
        return conn

    def _unusable(self, reason: str) -> None:
        """Turn the store off (memory-only caching) with one warning."""
        already = self.error is not None
        self.error = reason
        if self._read is not None:
            with contextlib.suppress(sqlite3.Error):
                self._read.close()
            self._read = None
        if not already:
            _warn(
                f"The cache database {str(self.path)!r} cannot be used ({reason}); stage outputs are "
                "cached in memory only for the rest of this process. Delete or move the file, or "
                "pass another persist_to=/cache= path."
            )

    @property
    def available(self) -> bool:
        """Whether the database is in use (``False`` after a damaged or foreign file was found)."""
        return self.error is None and self._read is not None

    def __deepcopy__(self, memo: dict[int, Any]) -> SQLiteStore:
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "lock_timeout": self.lock_timeout, "max_pending": self.max_pending}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["path"], lock_timeout=state["lock_timeout"], max_pending=state["max_pending"]
        )

    # -- reads ---------------------------------------------------------------------------------------

    def get(self, key: str) -> tuple[bool, Any]:
        """``(True, value)`` for a stored, decodable entry; otherwise ``(False, None)``."""
        self._report()
        with self._read_lock:
            conn = self._read
            if conn is None or self.error is not None:
                self.misses += 1
                return False, None
            try:
                row = conn.execute(f"SELECT value FROM {_TABLE} WHERE key = ?", (key,)).fetchone()
            except sqlite3.Error as e:
                self.misses += 1
                if not (isinstance(e, sqlite3.OperationalError) and is_lock_error(e)):
                    self._read_failed(str(e))
                return False, None
            if row is None:
                self.misses += 1
                return False, None
            try:
                value = codec.loads(row[0], self._allowed)
            except codec.UnknownType:
                self.unknown_types += 1
                self.misses += 1
                return False, None
            except codec.DecodeError as e:
                self.bad_entries += 1
                self.misses += 1
                self._warn_once(
                    "decode",
                    f"The cache database {str(self.path)!r} holds an entry stageflow cannot read ({e}); "
                    "it was treated as a miss and will be overwritten. Files written by another program "
                    "or another stageflow version, or damaged files, cause this.",
                )
                return False, None
            self.hits += 1
            return True, value

    def reject(self) -> None:
        """The entry :meth:`get` just returned cannot be the stage's output (the cache decided, see
        :meth:`~stageflow.policies.cache.CachePolicy.lookup`): count it as a miss and a bad entry."""
        with self._read_lock:
            self.hits -= 1
            self.misses += 1
            self.bad_entries += 1

    def _read_failed(self, reason: str) -> None:
        conn, self._read = self._read, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._unusable(f"reading it failed: {reason}")

    def _warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            _warn(message)

    # -- writes ----------------------------------------------------------------------------------------

    def set(self, key: str, value: Any) -> None:
        """Queue ``value`` for writing (raises :class:`~stageflow.policies.codec.Unencodable` when the
        format cannot store it). Waits while ``max_pending`` writes are already queued."""
        text = codec.dumps(value)
        self._report()
        queue = self._queue
        if queue is not None and self.available:
            queue.put(key, text)

    def _report(self) -> None:
        """Warn (from a caller's thread) about writes the background writer could not store."""
        queue = self._queue
        if queue is not None and queue.unreported:
            reasons, queue.unreported = queue.unreported, []
            _warn(
                f"{queue.lost_writes} cache write(s) to {str(self.path)!r} failed and were not stored "
                f"({reasons[-1]}). Those entries stay in this process's memory cache; see "
                "SQLiteStore.stats()['lost_writes'], and raise lock_timeout= if another process holds "
                "long write transactions."
            )

    def flush(self) -> None:
        """Wait until every queued write is on disk (or has finally failed, then warn)."""
        if self._queue is not None:
            self._queue.flush()
        self._report()

    def clear(self) -> None:
        """Delete every entry."""
        self.flush()
        with self._read_lock:
            if self._read is not None:
                with contextlib.suppress(sqlite3.Error), self._read:
                    self._read.execute(f"DELETE FROM {_TABLE}")
        self.hits = self.misses = 0

    def __len__(self) -> int:
        self.flush()
        with self._read_lock:
            if self._read is None:
                return 0
            return int(self._read.execute(f"SELECT COUNT(*) FROM {_TABLE}").fetchone()[0])

    def stats(self) -> dict[str, Any]:
        """Hits, misses, hit rate, and the health of the file: ``available`` (``error`` says why
        not), ``pending`` writes, ``written``, ``write_retries``, ``lost_writes`` (also as
        ``write_errors``), ``bad_entries`` and ``unknown_types`` (entries of classes this process
        may not decode yet)."""
        from stageflow.policies.cache import hit_stats

        self._report()
        q = self._queue
        return hit_stats(
            self.hits,
            self.misses,
            path=str(self.path),
            available=self.available,
            error=self.error,
            pending=q.pending if q is not None else 0,
            written=q.written if q is not None else 0,
            write_retries=q.write_retries if q is not None else 0,
            lost_writes=q.lost_writes if q is not None else 0,
            write_errors=q.lost_writes if q is not None else 0,
            bad_entries=self.bad_entries,
            unknown_types=self.unknown_types,
        )

    def close(self) -> None:
        """Flush and close the database (the store caches nothing on disk afterwards)."""
        if self._queue is not None:
            self._queue.close()
        self._report()
        with self._read_lock:
            if self._read is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._read.close()
            self._read = None
