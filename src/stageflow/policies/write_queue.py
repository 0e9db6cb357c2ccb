"""The background writer of a persistent cache store: bounded, batched, retried, flushed at exit.

A :class:`WriteQueue` holds ``(key, text)`` writes for one SQLite file and commits them from a
background thread in batches (one commit per ~50 ms burst), so a cache miss never waits for the
disk:

- **bounded** — at most ``max_pending`` writes are queued or in flight; a producer that finds the
  queue full waits for the writer (measured against committing its own write: waiting is faster,
  see ``benchmarks/cache_durability.py``);
- **retried** — a write that meets a lock held by another connection is retried with exponential
  backoff for up to ``lock_timeout`` seconds; what still fails is counted in ``lost_writes`` and
  its reason kept for the store to report — never dropped silently;
- **flushed at exit** — at normal interpreter exit (``atexit``) and on SIGTERM. The SIGTERM handler
  is installed (from the main thread) when the first queue is created; it writes what is queued
  using no lock another thread may hold, waits for a batch in flight, then runs the handler that
  was installed before it, or the default action (the process ends with the status a SIGTERM
  gives). A handler the program installs later replaces it; the program's own exit then flushes
  through ``atexit``.

What a SIGKILL can lose: the writes queued since the last commit (measured in BENCHMARKS.md).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["WriteQueue", "flush_all", "is_lock_error"]

_BATCH_WINDOW = 0.05  # seconds the writer waits to batch queued writes into one commit
_BATCH_MAX = 512
_IDLE_EXIT = 2.0  # an idle writer thread exits (and restarts on the next write)


def is_lock_error(error: sqlite3.Error) -> bool:
    """Whether ``error`` means "another connection holds the lock" (worth retrying)."""
    code = getattr(error, "sqlite_errorcode", None)
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return True
    text = str(error).lower()
    return "locked" in text or "busy" in text


class WriteQueue:
    """Queued writes of one database file (see the module docstring).

    Args:
        connect: Opens a new connection to the file (one per writer thread or flush).
        insert: The ``INSERT`` statement taking ``(key, value)``.
        lock_timeout: Seconds a batch keeps retrying while the database is locked.
        max_pending: Writes queued or in flight at most.
    """

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], insert: str, lock_timeout: float, max_pending: int
    ) -> None:
        self._connect = connect
        self._insert = insert
        self.lock_timeout = lock_timeout
        self.max_pending = max_pending
        self.when_full = "wait"  # or "write": the producer commits its own write (benchmarks compare)
        self._pending: deque[tuple[str, str]] = deque()
        self._cond = threading.Condition()
        self._inflight = 0
        self._flushing = 0
        self._writer: threading.Thread | None = None
        self.written = self.write_retries = self.lost_writes = 0
        self.unreported: list[str] = []  # reasons of lost writes not yet reported by the store
        _register(self)

    @property
    def pending(self) -> int:
        """Writes queued or being committed."""
        return len(self._pending) + self._inflight

    def put(self, key: str, text: str) -> None:
        """Queue one write; waits while ``max_pending`` writes are queued or in flight."""
        with self._cond:
            while len(self._pending) + self._inflight >= self.max_pending:
                if self.when_full == "write":
                    break
                self._ensure_writer()
                self._cond.wait(0.1)
            else:
                self._pending.append((key, text))
                self._ensure_writer()
                self._cond.notify_all()
                return
        self._write_now([(key, text)])  # the "write" policy: the producer commits its own write

    def _ensure_writer(self) -> None:
        if self._writer is None or not self._writer.is_alive():
            self._writer = threading.Thread(target=self._loop, name="stageflow-cache-writer", daemon=True)
            self._writer.start()

    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                with self._cond:
                    if not self._pending:
                        self._cond.wait(_IDLE_EXIT)
                        if not self._pending:
                            self._writer = None  # idle: exit; the next write starts a new thread
                            return
                    deadline = time.monotonic() + _BATCH_WINDOW
                    enough = min(_BATCH_MAX, self.max_pending)  # a full queue is written at once
                    while len(self._pending) < enough and not self._flushing:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    batch = self._take(_BATCH_MAX)
                    self._cond.notify_all()
                if conn is None:
                    conn = self._connect()
                self._commit(conn, batch)
                with self._cond:
                    self._inflight = 0
                    self._cond.notify_all()
        except sqlite3.Error as e:  # the file cannot even be opened any more
            with self._cond:
                self._lose(len(self._pending) + self._inflight, str(e))
                self._pending.clear()
                self._inflight = 0
                self._cond.notify_all()
        finally:
            if conn is not None:
                conn.close()

    def _take(self, n: int) -> list[tuple[str, str]]:
        """Pop up to ``n`` pending writes; ``_inflight`` is raised first, so a flush that looks at
        the queue from a signal handler never sees "empty and idle" while a batch is on its way."""
        self._inflight = min(n, len(self._pending))
        batch = []
        for _ in range(self._inflight):
            try:
                batch.append(self._pending.popleft())
            except IndexError:  # a signal handler's flush took the rest
                break
        return batch

    def _commit(self, conn: sqlite3.Connection, batch: list[tuple[str, str]]) -> None:
        """Write ``batch``, retrying with backoff while the database is locked."""
        if not batch:
            return
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.01
        while True:
            try:
                with conn:
                    conn.executemany(self._insert, batch)
                self.written += len(batch)
                return
            except sqlite3.OperationalError as e:
                if not is_lock_error(e):
                    self._lose(len(batch), str(e))
                    return
                if time.monotonic() + delay > deadline:
                    self._lose(len(batch), f"the database stayed locked for {self.lock_timeout:g} s")
                    return
                self.write_retries += 1
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except sqlite3.Error as e:
                self._lose(len(batch), str(e))
                return

    def _write_now(self, batch: list[tuple[str, str]]) -> None:
        try:
            conn = self._connect()
        except sqlite3.Error as e:
            self._lose(len(batch), str(e))
            return
        try:
            self._commit(conn, batch)
        finally:
            conn.close()

    def _lose(self, n: int, reason: str) -> None:
        if n:
            self.lost_writes += n
            self.unreported.append(reason)

    def flush(self) -> None:
        """Wait until every queued write is committed (or has finally failed)."""
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._pending or self._inflight:
                    if self._writer is None or not self._writer.is_alive():
                        break  # no writer (it went idle, or the interpreter is exiting): write here
                    self._cond.wait(0.1)
            finally:
                self._flushing -= 1
        if self._pending:
            self.drain()

    def drain(self, timeout: float | None = None) -> None:
        """Commit what is queued from the calling thread, without taking any lock another thread of
        this process may hold (safe in a signal handler), then wait for a batch in flight."""
        batch = []
        while True:
            try:
                batch.append(self._pending.popleft())
            except IndexError:
                break
        if batch:
            self._write_now(batch)
        deadline = time.monotonic() + (self.lock_timeout + 1 if timeout is None else timeout)
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.005)

    def close(self) -> None:
        """Flush; the queue is no longer flushed at exit."""
        self.flush()
        _LIVE.discard(self)


# -- process exit ----------------------------------------------------------------------------------

_LIVE: weakref.WeakSet[WriteQueue] = weakref.WeakSet()
_PREVIOUS: list[Any] = []
_ATEXIT: list[bool] = []


def _register(queue: WriteQueue) -> None:
    """Flush ``queue`` at exit and on SIGTERM (the handler is installed from the main thread only)."""
    _LIVE.add(queue)
    if not _ATEXIT:
        _ATEXIT.append(True)
        atexit.register(_flush_all)
    if threading.current_thread() is threading.main_thread():
        current = signal.getsignal(signal.SIGTERM)
        if current is not _on_sigterm:
            _PREVIOUS[:] = [current]
            signal.signal(signal.SIGTERM, _on_sigterm)


def flush_all() -> None:
    """Commit what every queue of this process holds (a worker process calls it before it exits
    without running ``atexit``)."""
    for queue in list(_LIVE):
        with contextlib.suppress(Exception):
            queue.flush()


_flush_all = flush_all


def _after_fork_in_child() -> None:
    """A forked child starts each queue empty, with a fresh lock and no writer: what was queued
    belongs to the parent, which writes it; its writer thread does not exist here, and its lock
    may have been held at the fork."""
    for queue in list(_LIVE):
        queue._cond = threading.Condition()
        queue._pending = deque()
        queue._inflight = queue._flushing = 0
        queue._writer = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _on_sigterm(signum: int, frame: Any) -> None:
    """Commit every queue, then do what would have happened without this handler."""
    for queue in list(_LIVE):
        with contextlib.suppress(Exception):
            queue.drain()
    previous = _PREVIOUS[0] if _PREVIOUS else signal.SIG_DFL
    if callable(previous):
        previous(signum, frame)
    elif previous == signal.SIG_IGN:
        return
    else:  # the default action: terminate, with the exit status a SIGTERM gives
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
