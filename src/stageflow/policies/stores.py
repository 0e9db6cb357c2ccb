"""Persistent cache stores.

:class:`SQLiteStore` keeps stage outputs in one SQLite file (stdlib, no server). Reads go to the
database on a memory miss; writes are queued and done by a background thread, so a miss does not
wait for the disk. ``flush()`` waits for pending writes (also called at interpreter exit).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import queue
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from stageflow.errors import ConfigurationError

__all__ = ["SQLiteStore"]

_BATCH_WINDOW = 0.05  # seconds the writer waits to batch queued writes into one commit
_BATCH_MAX = 512
_SCHEMA = "CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, value BLOB NOT NULL)"


class SQLiteStore:
    """A persistent key → value store in one SQLite file, with background writes.

    Args:
        path: The database file (created with its folder if missing).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(_SCHEMA)
            conn.commit()
        except (OSError, sqlite3.Error) as e:
            raise ConfigurationError(
                f"Cannot open the cache database {str(self.path)!r}: {e}", field="path", code="bad_cache_path"
            ) from e
        self._read = conn
        self._read_lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, bytes] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="stageflow-cache-writer", daemon=True)
        self._writer.start()
        self.hits = 0
        self.misses = 0
        self.write_errors = 0
        atexit.register(self.flush)

    def __deepcopy__(self, memo: dict[int, Any]) -> SQLiteStore:
        return self

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def _write_loop(self) -> None:
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across crashes, no fsync per commit
        while True:
            item = self._queue.get()
            batch = [] if item is None else [item]
            stop = item is None
            # Gather what else arrives within a short window, so a burst of misses is one commit.
            deadline = time.monotonic() + _BATCH_WINDOW
            while not stop and len(batch) < _BATCH_MAX:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                else:
                    batch.append(nxt)
            if batch:
                try:
                    conn.executemany("INSERT OR REPLACE INTO cache (key, value) VALUES (?, ?)", batch)
                    conn.commit()
                except sqlite3.Error:
                    self.write_errors += len(batch)
            for _ in range(len(batch) + (1 if stop else 0)):
                self._queue.task_done()
            if stop:
                conn.close()
                return

    def get(self, key: str) -> tuple[bool, Any]:
        with self._read_lock:
            row = self._read.execute("SELECT value FROM cache WHERE key = ?", (key,)).fetchone()
        if row is None:
            self.misses += 1
            return False, None
        try:
            value = pickle.loads(row[0])
        except Exception:
            self.misses += 1
            return False, None
        self.hits += 1
        return True, value

    def set(self, key: str, value: Any) -> None:
        try:
            blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            self.write_errors += 1  # unpicklable outputs stay in memory only
            return
        self._queue.put((key, blob))

    def flush(self) -> None:
        """Wait until every queued write is on disk."""
        if self._writer.is_alive():
            self._queue.join()

    def clear(self) -> None:
        """Delete every entry."""
        self.flush()
        with self._read_lock:
            self._read.execute("DELETE FROM cache")
            self._read.commit()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        self.flush()
        with self._read_lock:
            return int(self._read.execute("SELECT COUNT(*) FROM cache").fetchone()[0])

    def stats(self) -> dict[str, Any]:
        from stageflow.policies.cache import hit_stats

        return hit_stats(self.hits, self.misses, path=str(self.path), write_errors=self.write_errors)

    def close(self) -> None:
        """Flush, stop the writer and close the database."""
        self.flush()
        self._queue.put(None)
        self._writer.join(timeout=5)
        with contextlib.suppress(sqlite3.Error), self._read_lock:
            self._read.close()
