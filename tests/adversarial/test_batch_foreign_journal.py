"""A --journal path that is another program's SQLite database is refused and left unchanged (r_batch_2).

Before the fix, stageflow accepted it, switched it to WAL and added its tables next to the
application's (exit 0).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

import stageflow
from stageflow.runtime.journal import Journal, JournalError
from stageflow.runtime.journal_guard import APPLICATION_ID


@stageflow.stage(writes=["y"])
def work(x: str) -> dict[str, str]:
    return {"y": x.upper()}


PIPELINE = stageflow.SequentialPipeline([work])
RECORDS = [{"id": "a", "x": "one"}, {"id": "b", "x": "two"}]


def _run(journal: Path, tmp_path: Path) -> stageflow.BatchSummary:
    return stageflow.run_batch(
        PIPELINE, RECORDS, journal=journal, output=tmp_path / "o.jsonl", progress=False
    )


def _application_id(path: Path) -> int:
    con = sqlite3.connect(path)
    try:
        return int(con.execute("PRAGMA application_id").fetchone()[0])
    finally:
        con.close()


@pytest.mark.parametrize("kind", ["tables", "application_id"])
def test_another_programs_database_is_refused_and_left_unchanged(tmp_path: Path, kind: str) -> None:
    app = tmp_path / "app.db"
    con = sqlite3.connect(app)
    if kind == "tables":
        con.execute("CREATE TABLE customers (name)")
        con.execute("INSERT INTO customers VALUES ('alice')")
    else:
        con.execute("PRAGMA application_id = 1234")
    con.commit()
    con.close()
    before = app.read_bytes()
    with pytest.raises(JournalError, match="cannot be the batch journal") as info:
        _run(app, tmp_path)
    assert info.value.code == "foreign_journal"
    assert app.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # no lock, WAL or output file


@pytest.mark.parametrize("start", ["new", "empty"])
def test_a_new_path_or_an_empty_file_becomes_a_marked_journal(tmp_path: Path, start: str) -> None:
    journal = tmp_path / "j.db"
    if start == "empty":
        journal.write_bytes(b"")
    assert _run(journal, tmp_path).succeeded == 2
    assert _application_id(journal) == APPLICATION_ID
    assert _run(journal, tmp_path).skipped == 2  # reopened as a journal: resumed


def test_a_journal_from_before_the_marker_is_still_resumed(tmp_path: Path) -> None:
    journal = tmp_path / "j.db"
    with Journal(journal):
        pass
    con = sqlite3.connect(journal)
    con.execute("PRAGMA application_id = 0")  # as stageflow 0.1 wrote it
    con.commit()
    con.close()
    assert _run(journal, tmp_path).succeeded == 2
    assert _application_id(journal) == APPLICATION_ID


def test_the_cli_exits_2_naming_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stageflow.cli import main

    app = tmp_path / "app.db"
    con = sqlite3.connect(app)
    con.execute("CREATE TABLE customers (name)")
    con.close()
    (tmp_path / "p.yaml").write_text("inputs: [x]\nroot: {predict: 'x -> y'}\n", encoding="utf-8")
    (tmp_path / "d.jsonl").write_text('{"id": "a", "x": "1"}\n', encoding="utf-8")
    code = main(
        [
            "batch",
            str(tmp_path / "p.yaml"),
            str(tmp_path / "d.jsonl"),
            "-o",
            str(tmp_path / "o.jsonl"),
            "--journal",
            str(app),
            "--lm",
            "openai/x",
            "--api-base",
            "http://127.0.0.1:9",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "app.db" in err
    assert "'customers'" in err
