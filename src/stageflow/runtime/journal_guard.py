"""Recognising a batch journal before writing to it: never add tables to another program's database.

A journal is marked with SQLite's ``application_id`` header field (:data:`APPLICATION_ID`, set
when stageflow creates it). Before a journal is opened for writing, :func:`foreign_reason` reads
the file without changing it and says why it must not be used: a database of another application
(another ``application_id``, or tables that are not a journal's). A new path, an empty file and a
journal written before the marker existed (only stageflow's tables, with a ``version``) are fine;
a file that is not SQLite at all is left to SQLite's own error.

Examples:
    >>> import os, sqlite3, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "app.db")
    >>> foreign_reason(path) is None  # nothing there yet
    True
    >>> con = sqlite3.connect(path); _ = con.execute("CREATE TABLE customers (name)"); con.close()
    >>> foreign_reason(path)
    "it is an SQLite database with other tables ('customers'), not a stageflow batch journal"
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

__all__ = ["APPLICATION_ID", "foreign_reason", "mark"]

#: ``PRAGMA application_id`` of a stageflow batch journal ("SFBJ").
APPLICATION_ID = 0x5346424A
_MAGIC = b"SQLite format 3\x00"
_JOURNAL_TABLES = frozenset({"meta", "records", "runs"})


def foreign_reason(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` is not a batch journal to write to, or ``None`` when it may be used."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            header = fh.read(100)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if not header.startswith(_MAGIC) or len(header) < 72:
        return None  # empty (fine), or not SQLite: SQLite itself says so when it is opened
    app = int.from_bytes(header[68:72], "big")
    if app == APPLICATION_ID:
        return None
    if app != 0:
        return f"it is the SQLite database of another application (application_id {app:#010x})"
    try:
        with contextlib.closing(sqlite3.connect(f"{p.resolve().as_uri()}?mode=ro", uri=True)) as con:
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if not tables:
                return None
            if tables <= _JOURNAL_TABLES and "meta" in tables:
                row = con.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
                if row is not None:
                    return None  # a journal from before the marker
    except sqlite3.Error:
        return None  # damaged or unreadable: SQLite's own error follows when it is opened
    others = ", ".join(repr(t) for t in sorted(tables - _JOURNAL_TABLES) or sorted(tables))
    return f"it is an SQLite database with other tables ({others}), not a stageflow batch journal"


def mark(con: sqlite3.Connection) -> None:
    """Mark the database of ``con`` as a batch journal."""
    if con.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
        con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
