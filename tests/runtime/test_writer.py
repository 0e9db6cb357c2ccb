"""The journal writer: starts and results reach the rows exactly as one UPDATE per operation would
leave them, whether they come one by one, together in one queue item, or in a commit too big for
one statement."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from stageflow.runtime import writer as writer_module
from stageflow.runtime.journal import Journal
from stageflow.runtime.outcome import Outcome, Usage
from stageflow.runtime.writer import JournalWriter

COLUMNS = "seq, status, attempts, repeats, outputs, error, usage, elapsed, run_id"


def _journal(tmp_path: Path, n: int, status: dict[int, str] | None = None) -> Path:
    path = tmp_path / "j.sqlite"
    with Journal(path) as j:
        j.con.executemany(
            "INSERT INTO records (key, seq, id_json, input_hash, status) VALUES (?, ?, ?, 'h', ?)",
            [(str(i), i, json.dumps(i), (status or {}).get(i, "pending")) for i in range(n)],
        )
    return path


def _rows(path: Path) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(str(path))
    try:
        return con.execute(f"SELECT {COLUMNS} FROM records ORDER BY seq").fetchall()
    finally:
        con.close()


OK = Outcome(True, {"answer": "ä", "n": 1}, None, Usage(3, 40, 5, 0.25, 1, 0), 0.5)
ERR = Outcome(
    False,
    None,
    {"type": "ValueError", "message": "bad", "stage_path": "a/b", "code": None, "cause": None},
    Usage(1, 2, 3),
    0.25,
)


def test_results_sent_with_the_next_start_land_as_separate_calls_would(tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = _journal(tmp_path / "one", 4, {2: "running"})
    two = _journal(tmp_path / "two", 4, {2: "running"})
    a = JournalWriter(one, 7)
    a.start([0, 1])
    a.finish(0, OK)
    a.finish(1, ERR)
    a.start([2, 3])
    a.close()
    b = JournalWriter(two, 7)
    b.start([0, 1])
    b.start([2, 3], [(0, OK), (1, ERR)])
    b.close()
    rows = _rows(two)
    assert rows == _rows(one)
    assert rows[0] == (0, "done", 1, 0, '{"answer":"ä","n":1}', None, json.dumps(OK.usage.as_dict()), 0.5, 7)
    assert rows[1][:4] == (1, "failed", 1, 0)
    assert json.loads(rows[1][5])["stage_path"] == "a/b"
    assert rows[2][:4] == (2, "running", 1, 1)  # was running from an earlier run: a repeat
    assert rows[3][:4] == (3, "running", 1, 0)


def test_a_commit_larger_than_one_statement_is_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writer_module, "_ROWS_PER_STATEMENT", 3)
    path = _journal(tmp_path, 10)
    w = JournalWriter(path, 1)
    w.start(list(range(10)))
    w.start([], [(i, OK if i % 2 else ERR) for i in range(10)])
    w.close()
    rows = _rows(path)
    assert [r[1] for r in rows] == ["failed", "done"] * 5
    assert {r[2] for r in rows} == {1}
    assert w.commits == 2


def test_the_same_record_twice_in_one_commit_applies_in_order(tmp_path: Path) -> None:
    path = _journal(tmp_path, 2)
    rows = writer_module._groups([(0, 1), (1, 1), (0, 0), (1, 0)])  # type: ignore[list-item]
    assert rows == [[(0, 1), (1, 1)], [(0, 0), (1, 0)]]
    w = JournalWriter(path, 1)
    w._commit([("start", [0, 1], None, []), ("finish", 0, OK, ()), ("finish", 1, ERR, ())])
    w.close()
    assert [r[1:4] for r in _rows(path)] == [("done", 1, 0), ("failed", 1, 0)]


def test_usage_as_dict_matches_its_fields() -> None:
    usage = Usage(1, 2, 3, 0.5, 4, 5)
    assert usage.as_dict() == dataclasses.asdict(usage)
    assert list(usage.as_dict()) == [f.name for f in dataclasses.fields(Usage)]
    assert Usage.from_dict(usage.as_dict()) == usage


def test_a_closed_writer_writes_nothing(tmp_path: Path) -> None:
    path = _journal(tmp_path, 1)
    w = JournalWriter(path, 1)
    w.close()
    w.start([0], [(0, OK)])  # nothing is written after close
    w.finish(0, OK)
    assert _rows(path)[0][1] == "pending"
