"""The journal writer: record starts and results committed in groups, by the workers themselves.

A worker that starts a record commits that start before the record runs, so the journal knows
about every record before any work is spent on it: that is what makes the "repeated work" count
after a crash exact. A record's result rides with the same worker's next start (one commit for
both), or is committed on its own when the worker has no next record.

Group commit without a writer thread: a worker adds its operations to the pending list and takes
the commit lock; whoever holds it commits everything pending in one statement, so while one
worker commits, the others' operations gather for the next commit. An earlier version handed
operations to a writer thread; under 32 busy worker threads that thread had to win the GIL for
every wake-up and every SQLite step, and a record's start waited 2-4 ms for its commit.

With ``journal_mode=WAL`` and ``synchronous=NORMAL`` a commit is durable against a killed process
(SIGKILL included) without an fsync per commit; after a power loss the last commits may be lost,
and those records simply run again.
"""

from __future__ import annotations

import functools
import itertools
import json
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stageflow.runtime.outcome import Outcome, to_json

__all__ = ["JournalWriter"]

# One statement applies a commit's starts and results (rows of ``v``: seq, is-start, then the
# result's columns). A start counts a repeat when the record is still ``running`` from an earlier
# run; SET expressions read the row as it was. One statement instead of BEGIN / executemany /
# COMMIT matters under load: SQLite releases the GIL around every statement step, and each time
# the committing thread has to wait its turn behind the busy workers to get it back.
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


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the journal's settings (WAL, synchronous=NORMAL, autocommit off)."""
    con = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    con.execute("PRAGMA temp_store = MEMORY")
    return con


class JournalWriter:
    """Commits record starts and results for one run, from the calling worker threads.

    Args:
        path: The journal database.
        run_id: The run the rows are attributed to.
    """

    def __init__(self, path: Path, run_id: int) -> None:
        self.run_id = run_id
        #: The error of a failed commit; later operations are dropped (the runner stops the batch).
        self.error: BaseException | None = None
        #: Commits made (each applies every operation pending at that moment).
        self.commits = 0
        self._pending: list[Any] = []
        self._pending_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._closed = False
        self._con: sqlite3.Connection | None = connect(path)

    def start(self, seqs: Sequence[int], finished: Sequence[tuple[int, Outcome]] = ()) -> None:
        """Mark records as started; returns once that is committed (or failed: :attr:`error`).

        ``finished``: results of earlier records, committed in the same statement, before the
        starts (as :meth:`finish` calls made just before would be).
        """
        if not self._closed and self.error is None:
            self._apply(("start", seqs, None, finished))

    def finish(self, seq: int, outcome: Outcome) -> None:
        """Record a finished record; returns once that is committed (or failed)."""
        if not self._closed:
            self._apply(("finish", seq, outcome, ()))

    def close(self) -> None:
        """Commit what is pending and close the connection; later operations are ignored."""
        self._closed = True
        with self._commit_lock:
            self._commit_pending()
            if self._con is not None:
                self._con.close()
                self._con = None

    def _apply(self, item: tuple[Any, ...]) -> None:
        with self._pending_lock:
            self._pending.append(item)
        # Whoever holds the lock commits everything pending, this item included unless an earlier
        # holder already did: once the lock is ours, it is committed either way.
        with self._commit_lock:
            self._commit_pending()

    def _commit_pending(self) -> None:
        with self._pending_lock:
            items, self._pending = self._pending, []
        if not items or self.error is not None or self._con is None:
            return
        try:
            self._commit(items)
        except BaseException as exc:  # surfaced to the runner, which stops the batch
            self.error = exc

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
        assert con is not None
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
