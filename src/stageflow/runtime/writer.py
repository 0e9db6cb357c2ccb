"""The journal's writer thread: record starts and results committed in batches, off the workers.

Workers hand operations to a queue; one thread owns its own SQLite connection, drains the queue
and commits everything waiting in one transaction (group commit). A worker that starts a record
waits for that commit, so the journal knows about every record before any work is spent on it:
that is what makes the "repeated work" count after a crash exact. Results are fire-and-forget.

With ``journal_mode=WAL`` and ``synchronous=NORMAL`` a commit is durable against a killed process
(SIGKILL included) without an fsync per commit; after a power loss the last commits may be lost,
and those records simply run again.
"""

from __future__ import annotations

import json
import queue
import sqlite3
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stageflow.runtime.outcome import Outcome, to_json

__all__ = ["JournalWriter"]

# A record still ``running`` when it starts was in flight when an earlier run stopped: a repeat.
_START = (
    "UPDATE records SET repeats = repeats + (status = 'running'), status = 'running', "
    "attempts = attempts + 1, run_id = ? WHERE seq = ?"
)
_FINISH = (
    "UPDATE records SET status = ?, outputs = ?, error = ?, usage = ?, elapsed = ?, run_id = ? WHERE seq = ?"
)
_STOP = object()
_MAX_BATCH = 2000


def connect(path: Path) -> sqlite3.Connection:
    """A connection with the journal's settings (WAL, synchronous=NORMAL, autocommit off)."""
    con = sqlite3.connect(str(path), timeout=30.0, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA journal_mode = WAL")
    con.execute("PRAGMA synchronous = NORMAL")
    con.execute("PRAGMA temp_store = MEMORY")
    return con


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

    def start(self, seqs: Sequence[int]) -> threading.Event:
        """Mark records as started; the returned event is set once that is committed (or failed)."""
        event = threading.Event()
        if self._closed or self.error is not None:
            event.set()
            return event
        self._queue.put(("start", seqs, event))
        return event

    def finish(self, seq: int, outcome: Outcome) -> None:
        """Record a finished record (committed with the next batch)."""
        if not self._closed:
            self._queue.put(("finish", seq, outcome))

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
            events = [item[2] for item in batch if item is not _STOP and item[0] == "start"]
            if self.error is None:
                try:
                    self._commit([item for item in batch if item is not _STOP])
                except BaseException as exc:  # surfaced to the runner, which stops the batch
                    self.error = exc
            for event in events:
                event.set()

    def _commit(self, items: list[Any]) -> None:
        if not items:
            return
        starts: list[tuple[int, int]] = []
        finishes: list[tuple[Any, ...]] = []
        run = self.run_id
        for kind, arg, payload in items:
            if kind == "start":
                starts.extend((run, seq) for seq in arg)
            else:
                o: Outcome = payload
                outputs = o.outputs if isinstance(o.outputs, str) or o.outputs is None else to_json(o.outputs)
                finishes.append(
                    (
                        "done" if o.ok else "failed",
                        outputs,
                        None if o.error is None else to_json(o.error),  # compact, as the output rows
                        json.dumps(o.usage.as_dict()),
                        o.elapsed,
                        run,
                        arg,
                    )
                )
        con = self._con
        con.execute("BEGIN")
        try:
            if finishes:
                con.executemany(_FINISH, finishes)
            if starts:
                con.executemany(_START, starts)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        self.commits += 1
