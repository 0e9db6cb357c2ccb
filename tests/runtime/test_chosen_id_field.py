"""A chosen id field must exist in every record (issue 12 verification).

Reproducer: ``stageflow batch ... --id-field idd`` on a JSONL file whose records have ``id``
silently keyed every record by its line number and exited 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import stageflow
from stageflow import ConfigurationError


def _pipeline() -> stageflow.SequentialPipeline:
    return stageflow.SequentialPipeline([stageflow.stage(lambda q: {"a": q}, writes=["a"])])


def test_a_misspelled_id_field_is_refused_naming_the_record(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"r{i}", "q": str(i)}) for i in range(3)) + "\n")
    with pytest.raises(ConfigurationError, match=r"no record has the 'idd' field") as info:
        stageflow.run_batch(_pipeline(), data, output=tmp_path / "out.jsonl", id_field="idd")
    assert info.value.field == "idd"
    assert not (tmp_path / "out.jsonl").exists()


def test_records_given_in_python_need_the_chosen_field_somewhere(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="no record has the 'key' field"):
        stageflow.run_batch(_pipeline(), [{"q": "1"}, {"q": "2"}], id_field="key", journal=tmp_path / "j")


def test_the_default_id_field_may_be_absent(tmp_path: Path) -> None:
    summary = stageflow.run_batch(_pipeline(), [{"q": "1"}, {"q": "2"}], journal=tmp_path / "j")
    assert [row.id for row in summary.rows()] == [1, 2]


@pytest.mark.parametrize("suffix", ["csv", "jsonl"])
def test_id_named_explicitly_must_exist_too(tmp_path: Path, suffix: str) -> None:
    """``--id-field id`` on data without an ``id`` column keyed every record by line number, exactly
    as if the option had been left out."""
    data = tmp_path / f"data.{suffix}"
    if suffix == "csv":
        data.write_text("q\n1\n2\n")
        expected = r"the CSV header has no 'id' column"
    else:
        data.write_text('{"q": "1"}\n{"q": "2"}\n')
        expected = r"no record has the 'id' field"
    with pytest.raises(ConfigurationError, match=expected) as info:
        stageflow.run_batch(_pipeline(), data, output=tmp_path / "out.jsonl", id_field="id")
    assert info.value.field == "id"
    assert not (tmp_path / "out.jsonl").exists()
    left_out = stageflow.run_batch(_pipeline(), data, output=tmp_path / "out.jsonl")  # (the default)
    assert [row.id for row in left_out.rows()] == ([2, 3] if suffix == "csv" else [1, 2])  # line numbers
