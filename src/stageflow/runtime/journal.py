"""The batch journal: one SQLite file that is the source of truth of a batch run.

It holds the plan (every record's key, position and input hash), each record's status
(``pending`` → ``running`` → ``done`` / ``failed``), outputs, error and usage, the program
fingerprint and input digest it was planned with, and one row per run (what changed and was
allowed, how many records ran, failed or were repeated). The output file is written from it.

Only one process may use a journal at a time: a lock file next to it is held for the whole run
(the operating system releases it when the process dies, however it dies).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stageflow.errors import ConfigurationError
from stageflow.runtime.journal_guard import foreign_reason, mark
from stageflow.runtime.records import Record, RecordSource, input_hash
from stageflow.runtime.writer import JournalWriter, connect

__all__ = ["Journal", "JournalError", "Plan", "ScanResult"]

SCHEMA_VERSION = "1"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY,
    seq INTEGER UNIQUE,
    id_json TEXT NOT NULL,
    input_hash TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    repeats INTEGER NOT NULL DEFAULT 0,
    outputs TEXT,
    error TEXT,
    usage TEXT,
    elapsed REAL,
    run_id INTEGER
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    started TEXT NOT NULL,
    finished TEXT,
    state TEXT NOT NULL,
    backend TEXT,
    command TEXT,
    fingerprint TEXT,
    input_digest TEXT,
    allowed_changes TEXT,
    ran INTEGER,
    failed INTEGER,
    repeated INTEGER
);
"""


class JournalError(ConfigurationError):
    """The batch journal cannot be used: locked by another run, from another version, unwritable,
    or planned for a different program or input (resume refused)."""

    default_code = "journal"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


@dataclass
class ScanResult:
    """What reading the whole input found."""

    count: int = 0
    digest: str = ""
    #: Each distinct set of input field names, with the line (or position) and id where it first appears.
    field_sets: dict[frozenset[str], tuple[int, str]] = field(default_factory=dict)


@dataclass
class Plan:
    """The records this run has to do, by position: ``seq -> (status, input_hash)``."""

    todo: dict[int, tuple[str, str]]
    total: int
    done: int
    failed: int


_OPEN: set[tuple[int, int] | None] = set()  # (device, inode) of the journals open in this process
_OPEN_LOCK = threading.Lock()
_LOCK_FDS: set[int] = set()  # the descriptors holding those journals' locks


def _after_fork_in_child() -> None:
    """A forked child (the batch process backend) runs records, never a journal: it closes its
    copies of the lock descriptors, so a lock is held only as long as the journal's own process
    holds it (a child outliving a killed parent does not keep the journal locked)."""
    global _OPEN_LOCK
    _OPEN_LOCK = threading.Lock()
    for fd in _LOCK_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _LOCK_FDS.clear()
    _OPEN.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _in_use(path: Path) -> JournalError:
    return JournalError(
        f"the journal {path} is in use by another batch run.",
        code="journal_locked",
        hint="wait for that run to finish (or stop it), or pass another --journal",
    )


class Journal:
    """A batch journal file (see the module docstring). Use as a context manager."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise JournalError(
                f"cannot create the journal {self.path}: the directory {self.path.parent} does not exist.",
                code="bad_journal",
            )
        # Another journal of this process on the same file: refused before this one opens the file,
        # since closing any descriptor of it would drop the SQLite locks the running one holds.
        self._identity = _identity(self.path)
        self._lock_fd: int | None = None
        with _OPEN_LOCK:
            if self._identity is not None and self._identity in _OPEN:
                raise _in_use(self.path)
            if self._identity is not None:
                _OPEN.add(self._identity)
        try:
            self._open()
        except BaseException:
            self._forget()
            raise

    def _open(self) -> None:
        foreign = foreign_reason(self.path)
        if foreign is not None:
            raise JournalError(
                f"{self.path} cannot be the batch journal: {foreign}. It was left unchanged.",
                code="foreign_journal",
                hint="pass another --journal path (journal= in Python): a new file, or one stageflow wrote",
            )
        self._lock_fd = self._lock()
        try:
            self.con = connect(self.path)
            self.con.executescript(_SCHEMA)
            mark(self.con)
            version = self.meta().get("version")
            if version is None:
                self._set_meta(version=SCHEMA_VERSION)
            elif version != SCHEMA_VERSION:
                raise JournalError(
                    f"the journal {self.path} has format version {version}; this stageflow reads "
                    f"version {SCHEMA_VERSION}.",
                    code="journal_version",
                    hint="finish it with the stageflow that wrote it, or start over with --no-resume",
                )
            self._add_missing_columns()
        except sqlite3.DatabaseError as exc:
            self._unlock()
            raise JournalError(
                f"{self.path} is not a usable batch journal: {exc}.",
                code="bad_journal",
                hint="pass another --journal path, or remove this file to start over",
            ) from exc
        except BaseException:
            self._unlock()
            raise

    def _add_missing_columns(self) -> None:
        """Bring a journal written by an earlier stageflow up to date (same format version).

        ``repeats`` counts the starts of a record that an earlier run left ``running`` (its work was
        lost). Journals from before it only had ``attempts``, which also counts failed records run
        again on purpose, so their repeats start at 0.
        """
        columns = {row[1] for row in self.con.execute("PRAGMA table_info(records)")}
        if "repeats" not in columns:
            self.con.execute("ALTER TABLE records ADD COLUMN repeats INTEGER NOT NULL DEFAULT 0")

    # -- locking ---------------------------------------------------------------------------------
    def _lock(self) -> int | None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock
            return None
        # The database file itself is locked (BSD flock: independent of SQLite's own POSIX locks), so
        # every name of it — a symlink, a hard link, "./j" and "j" — finds the same lock. The file
        # descriptor stays open until the journal closes (closing another one would drop SQLite's
        # locks on the file).
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise _in_use(self.path) from exc
        _LOCK_FDS.add(fd)
        if self._identity is None:  # (the file is new: now it has an identity)
            identity = _identity(self.path)
            with _OPEN_LOCK:
                if identity in _OPEN:
                    _LOCK_FDS.discard(fd)
                    os.close(fd)
                    raise _in_use(self.path)
                _OPEN.add(identity)
            self._identity = identity
        return fd

    def _forget(self) -> None:
        with _OPEN_LOCK:
            _OPEN.discard(self._identity)

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            _LOCK_FDS.discard(self._lock_fd)
            os.close(self._lock_fd)
            self._lock_fd = None

    def close(self) -> None:
        """Close the database and release the lock."""
        with contextlib.suppress(Exception):
            self.con.close()
        self._unlock()
        self._forget()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta ------------------------------------------------------------------------------------
    def meta(self) -> dict[str, str]:
        """The journal's metadata (version, fingerprint, input digest and identity...)."""
        return dict(self.con.execute("SELECT key, value FROM meta").fetchall())

    def _set_meta(self, **values: str) -> None:
        self.con.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", list(values.items()))

    def has_plan(self) -> bool:
        """Whether a run already planned records in this journal."""
        return "input_digest" in self.meta()

    def reset(self) -> int:
        """Forget every record and run (start over); returns how many records were finished."""
        finished = self.con.execute(
            "SELECT COUNT(*) FROM records WHERE status IN ('done', 'failed')"
        ).fetchone()
        self.con.execute("BEGIN")
        self.con.execute("DELETE FROM records")
        self.con.execute("DELETE FROM runs")
        self.con.execute("DELETE FROM meta WHERE key != 'version'")
        self.con.execute("COMMIT")
        return int(finished[0])

    # -- planning --------------------------------------------------------------------------------
    def scan(self, source: RecordSource) -> ScanResult:
        """Read the whole input into a temporary table; returns its digest and field sets."""
        result = ScanResult()
        digest = hashlib.sha256()

        def rows() -> Iterator[tuple[int, str, str, str]]:
            for rec in source.scan():
                h = input_hash(rec.inputs, f"{source.label}, record {rec.key!r} (line {rec.line})")
                digest.update(f"{rec.key}\x1f{h}\n".encode())
                names = frozenset(rec.inputs)
                if names not in result.field_sets and len(result.field_sets) < 64:
                    result.field_sets[names] = (rec.line, rec.key)
                result.count += 1
                yield rec.seq, rec.key, json.dumps(rec.id), h

        con = self.con
        con.execute("DROP TABLE IF EXISTS temp.scan")
        con.execute(
            "CREATE TEMP TABLE scan (seq INTEGER PRIMARY KEY, key TEXT, id_json TEXT, input_hash TEXT)"
        )
        con.execute("BEGIN")
        try:
            con.executemany("INSERT INTO temp.scan VALUES (?, ?, ?, ?)", rows())
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        result.digest = digest.hexdigest()[:32]
        return result

    def differences(self) -> dict[str, int]:
        """How the scanned input differs from the planned one: added, removed, changed records."""
        q = self.con.execute
        added = q(
            "SELECT COUNT(*) FROM temp.scan s WHERE NOT EXISTS (SELECT 1 FROM records r WHERE r.key = s.key)"
        )
        removed = q(
            "SELECT COUNT(*) FROM records r WHERE r.seq IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM temp.scan s WHERE s.key = r.key)"
        )
        changed = q(
            "SELECT COUNT(*) FROM records r JOIN temp.scan s ON s.key = r.key "
            "WHERE s.input_hash != r.input_hash"
        )
        return {
            "added": int(added.fetchone()[0]),
            "removed": int(removed.fetchone()[0]),
            "changed": int(changed.fetchone()[0]),
        }

    def apply_scan(
        self,
        scan: ScanResult,
        fingerprint: str,
        identity: dict[str, Any],
        stage_fingerprints: dict[str, str] | None = None,
    ) -> None:
        """Make the scanned input the plan: new records pending, changed ones pending again,
        removed ones out of the output (kept in the journal); record the fingerprints (the whole
        program's and, when given, each stage's) and the input digest."""
        con = self.con
        con.execute("BEGIN")
        try:
            con.execute("UPDATE records SET seq = NULL")
            con.execute(
                "INSERT INTO records (key, seq, id_json, input_hash) "
                "SELECT key, seq, id_json, input_hash FROM temp.scan WHERE true "
                "ON CONFLICT(key) DO UPDATE SET seq = excluded.seq, id_json = excluded.id_json, "
                "status = CASE WHEN records.input_hash = excluded.input_hash "
                "THEN records.status ELSE 'pending' END, "
                "attempts = CASE WHEN records.input_hash = excluded.input_hash "
                "THEN records.attempts ELSE 0 END, "
                "repeats = CASE WHEN records.input_hash = excluded.input_hash "
                "THEN records.repeats ELSE 0 END, "
                "input_hash = excluded.input_hash"
            )
            if stage_fingerprints is not None:
                self._set_meta(stage_fingerprints=json.dumps(stage_fingerprints, sort_keys=True))
            self._set_meta(
                fingerprint=fingerprint,
                input_digest=scan.digest,
                input_identity=json.dumps(identity),
                record_count=str(scan.count),
            )
            if "created" not in self.meta():
                self._set_meta(created=_now())
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise

    def stage_fingerprints(self) -> dict[str, str] | None:
        """``stage path -> fingerprint`` recorded with the plan; ``None`` for a journal written before
        they were kept (or without a plan)."""
        raw = self.meta().get("stage_fingerprints")
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(value, dict):
            return None
        return {str(k): str(v) for k, v in value.items()}

    def plan(self, retry_failed: bool) -> Plan:
        """The records to run: pending ones, ones interrupted while running, and failed ones when
        ``retry_failed``."""
        wanted = ("pending", "running", "failed") if retry_failed else ("pending", "running")
        marks = ",".join("?" * len(wanted))
        todo = {
            seq: (status, h)
            for seq, status, h in self.con.execute(
                f"SELECT seq, status, input_hash FROM records WHERE seq IS NOT NULL AND status IN ({marks})",
                wanted,
            )
        }
        counts = dict(
            self.con.execute(
                "SELECT status, COUNT(*) FROM records WHERE seq IS NOT NULL GROUP BY status"
            ).fetchall()
        )
        return Plan(todo, sum(counts.values()), counts.get("done", 0), counts.get("failed", 0))

    # -- runs ------------------------------------------------------------------------------------
    def begin_run(self, *, backend: str, command: str | None, allowed_changes: str | None) -> int:
        meta = self.meta()
        cur = self.con.execute(
            "INSERT INTO runs (started, state, backend, command, fingerprint, input_digest, allowed_changes) "
            "VALUES (?, 'running', ?, ?, ?, ?, ?)",
            (_now(), backend, command, meta.get("fingerprint"), meta.get("input_digest"), allowed_changes),
        )
        return int(cur.lastrowid or 0)

    def end_run(self, run_id: int, *, state: str, ran: int, failed: int, repeated: int) -> None:
        self.con.execute(
            "UPDATE runs SET finished = ?, state = ?, ran = ?, failed = ?, repeated = ? WHERE id = ?",
            (_now(), state, ran, failed, repeated, run_id),
        )

    def writer(self, run_id: int) -> JournalWriter:
        """The writer of this run's record starts and results."""
        return JournalWriter(self.path, run_id)

    # -- reading results -------------------------------------------------------------------------
    def totals(self) -> dict[str, int]:
        """Counts over the current plan: records, done, failed, and repeated work across all runs (starts
        of records an earlier run left in flight; failed records retried on purpose are not repeats)."""
        total, done, failed, repeated = self.con.execute(
            "SELECT COUNT(*), SUM(status = 'done'), SUM(status = 'failed'), SUM(repeats) "
            "FROM records WHERE seq IS NOT NULL"
        ).fetchone()
        return {"total": total, "done": done or 0, "failed": failed or 0, "repeated": repeated or 0}

    def rows(self) -> Iterator[tuple[str, str, str | None, str | None]]:
        """``(id_json, status, outputs_json, error_json)`` of every planned record, in input order."""
        cur = self.con.execute(
            "SELECT id_json, status, outputs, error FROM records WHERE seq IS NOT NULL ORDER BY seq"
        )
        yield from cur

    def pending_records(self, source: RecordSource, plan: Plan) -> Iterator[Record]:
        """The records of ``plan.todo`` read from ``source``, checked against their planned hash."""
        todo = plan.todo
        left = len(todo)
        if not left:
            return
        for rec in source.scan():
            entry = todo.get(rec.seq)
            if entry is None:
                continue
            if input_hash(rec.inputs) != entry[1]:
                raise JournalError(
                    f"{source.label} changed while the batch was running (record {rec.key!r} at line "
                    f"{rec.line} differs from when the run started).",
                    code="input_changed",
                    hint="leave the input file alone during a run; run the same command again to resume",
                )
            yield rec
            left -= 1
            if not left:
                return
