"""The journal's writer thread: record starts and results committed in batches, off the workers.

Workers hand operations to a queue; one thread owns its own SQLite connection, drains the queue
and commits everything waiting in one transaction (group commit). A worker that starts a record
waits for that commit, so the journal knows about every record before any work is spent on it:
that is what makes the "repeated work" count after a crash exact. Results are fire-and-forget, or
ride with the same worker's next start (one queue item, one commit, instead of two commits with
the start queued behind the result's): under 32 busy threads each commit costs the writer
several waits for the GIL, and a record's start waits for its commit.

With ``journal_mode=WAL`` and ``synchronous=NORMAL`` a commit is durable against a killed process
(SIGKILL included) without an fsync per commit; after a power loss the last commits may be lost,
and those records simply run again.
"""

from __future__ import annotations

import functools
import itertools
import json
import queue
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stageflow.runtime.outcome import Outcome, to_json

__all__ = ["JournalWriter", "Started"]

# One statement applies a commit's starts and results (rows of ``v``: seq, is-start, then the
# result's columns). A start counts a repeat when the record is still ``running`` from an earlier
# run; SET expressions read the row as it was. One statement instead of BEGIN / executemany /
# COMMIT matters under load: SQLite releases the GIL around every statement step, and each time
# the writer thread has to wait its turn behind the busy workers to get it back.
_APPLY = (
    "WITH v(vseq, vstart, vstatus, voutputs, verror, vusage, velapsed) AS (VALUES {rows}) "
    "UPDATE records SET "
    "repeats = records.repeats + (v.vstart AND records.status = 'running'), "
    "attempts = records.attempts + v.vstart, "
    "status = CASE WHEN v.vstart THEN 'running' ELSE v.vstatus END, "
    "outputs = CASE WHEN v.vstart THEN records.outputs ELSE v.voutputs END, "
    "error = CASE WHEN v.vstart THEN records.error ELSE v.verror END, "
    "usage = CASE WHEN v.vstart THEN records.usage ELSE v.vusage END, "
    "elapsed = CASE WHEN v.vstart THEN records.elapsed ELSE v.velapsed END, "
    "run_id = ? FROM v WHERE records.seq = v.vseq"
)
_ROWS_PER_STATEMENT = 200  # 7 parameters a row: far below SQLite's limit of 32,766
_STOP = object()
_MAX_BATCH = 2000


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the journal's settings (WAL, synchronous=NORMAL, autocommit off)."""
    con = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    con.execute("PRAGMA temp_store = MEMORY")
    return con


class Started:
    """Set once a start is committed (or failed); a lock handed from the writer to the worker,
    cheaper than a ``threading.Event`` on this hot path."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def set(self) -> None:
        """Wake the waiter (called once)."""
        self._lock.release()

    def wait(self) -> None:
        """Block until :meth:`set`."""
        self._lock.acquire()
        self._lock.release()


_DONE = Started()
_DONE.set()


class JournalWriter:
    """Commits record starts and results for one run from a background thread.

    Args:
        path: The journal database.
        run_id: The run the rows are attributed to.
    """

    def __init__(self, path: Path, run_id: int) -> None:
        self.run_id = run_id
        self.error: BaseException | None = None
        self.commits = 0
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        self._con = connect(path)
        self._thread = threading.Thread(target=self._loop, name="stageflow-journal", daemon=True)
        self._thread.start()

    def start(self, seqs: Sequence[int], finished: Sequence[tuple[int, Outcome]] = ()) -> Started:
        """Mark records as started; :meth:`Started.wait` returns once that is committed (or failed).

        ``finished``: results of earlier records, committed in the same transaction, before the
        starts (as :meth:`finish` calls made just before would be).
        """
        if self._closed or self.error is not None:
            return _DONE
        started = Started()
        self._queue.put(("start", seqs, started, finished))
        return started

    def finish(self, seq: int, outcome: Outcome) -> None:
        """Record a finished record (committed with the next batch)."""
        if not self._closed:
            self._queue.put(("finish", seq, outcome, ()))

    def close(self) -> None:
        """Commit what is queued and stop the thread; later calls are ignored."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join()
        self._con.close()

    # -- the thread ------------------------------------------------------------------------------
    def _loop(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            events: list[Started] = [item[2] for item in batch if item is not _STOP and item[0] == "start"]
            if self.error is None:
                try:
                    self._commit([item for item in batch if item is not _STOP])
                except BaseException as exc:  # surfaced to the runner, which stops the batch
                    self.error = exc
            for event in events:
                event.set()

    def _commit(self, items: list[Any]) -> None:
        rows: list[tuple[Any, ...]] = []
        for kind, arg, payload, done in items:
            if kind == "start":
                rows.extend(_finish_row(seq, o) for seq, o in done)
                rows.extend((seq, 1, None, None, None, None, None) for seq in arg)
            else:
                rows.append(_finish_row(arg, payload))
        if not rows:
            return
        groups = _groups(rows)
        con = self._con
        if len(groups) == 1:  # one statement is one transaction
            con.execute(_apply_sql(len(rows)), [*itertools.chain.from_iterable(rows), self.run_id])
        else:
            con.execute("BEGIN")
            try:
                for group in groups:
                    con.execute(_apply_sql(len(group)), [*itertools.chain.from_iterable(group), self.run_id])
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        self.commits += 1


@functools.lru_cache(maxsize=64)
def _apply_sql(n: int) -> str:
    return _APPLY.format(rows=",".join(["(?,?,?,?,?,?,?)"] * n))


def _groups(rows: list[tuple[Any, ...]]) -> list[list[tuple[Any, ...]]]:
    """``rows`` in order, cut into statements of at most ``_ROWS_PER_STATEMENT`` rows, each record
    at most once per statement (an UPDATE ... FROM applies one source row per target row)."""
    groups: list[list[tuple[Any, ...]]] = [[]]
    seen: set[int] = set()
    for row in rows:
        if len(groups[-1]) >= _ROWS_PER_STATEMENT or row[0] in seen:
            groups.append([])
            seen.clear()
        groups[-1].append(row)
        seen.add(row[0])
    return groups


def _finish_row(seq: int, o: Outcome) -> tuple[Any, ...]:
    outputs = o.outputs if isinstance(o.outputs, str) or o.outputs is None else to_json(o.outputs)
    return (
        seq,
        0,
        "done" if o.ok else "failed",
        outputs,
        None if o.error is None else to_json(o.error),  # compact, as the output rows
        json.dumps(o.usage.as_dict()),
        o.elapsed,
    )
