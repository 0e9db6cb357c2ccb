"""Batch input files with a byte order mark, and CSV headers without the id column (r_batch_1).

Before the fix, a CSV with a UTF-8 BOM (what Excel's "CSV UTF-8" writes) kept the BOM in its first
column name, so the ``id`` column was not recognised: records were keyed by line number and the
pipeline received a field named ``\\ufeffid``, exit 0, no warning. A BOM in JSON Lines was refused.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import stageflow
from stageflow.errors import ConfigurationError
from stageflow.runtime.records import open_records

BOM = b"\xef\xbb\xbf"


@pytest.mark.parametrize(
    ("name", "body"),
    [("d.csv", b"id,x\na,1\nb,2\n"), ("d.jsonl", b'{"id": "a", "x": "1"}\n{"id": "b", "x": "2"}\n')],
)
def test_a_bom_is_skipped_in_both_formats(tmp_path: Path, name: str, body: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(BOM + body)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records = list(open_records(path).scan())
    assert [(r.key, r.inputs) for r in records] == [("a", {"x": "1"}), ("b", {"x": "2"})]


def test_a_bom_csv_runs_keyed_by_its_ids(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_bytes(BOM + b"id,x\na,1\nb,2\n")

    @stageflow.stage(writes=["y"])
    def work(x: str) -> dict[str, str]:
        return {"y": x}

    summary = stageflow.run_batch(
        stageflow.SequentialPipeline([work]), tmp_path / "d.csv", output=tmp_path / "o.jsonl", progress=False
    )
    assert [(row.id, row.outputs) for row in summary.rows()] == [("a", {"y": "1"}), ("b", {"y": "2"})]


def test_a_header_with_a_lookalike_id_column_warns_once(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("ID,x\na,1\nb,2\n", encoding="utf-8")
    source = open_records(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = list(source.scan())
        list(source.scan())  # the runner reads a source twice: still one warning
    assert len(caught) == 1
    assert "d.csv line 1: the CSV header has no 'id' column, but has 'ID'" in str(caught[0].message)
    assert [r.key for r in first] == ["2", "3"]


def test_a_chosen_id_field_missing_from_the_header_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("id,x\na,1\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="no 'key' column") as info:
        list(open_records(path, id_field="key").scan())
    assert info.value.field == "key"
