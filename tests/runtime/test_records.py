"""Batch input: JSON Lines and CSV files, records given in Python, keys and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from stageflow.errors import ConfigurationError
from stageflow.runtime.records import input_hash, open_records


def keys(source: object) -> list[tuple[str, object, dict[str, object], int]]:
    return [(r.key, r.id, r.inputs, r.line) for r in source.scan()]  # type: ignore[attr-defined]


def test_jsonl_keys_by_id_or_line_number_and_skips_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"id": "a", "q": 1}\n\n{"q": 2}\n{"id": 7, "q": 3}\n', encoding="utf-8")
    assert keys(open_records(path)) == [
        ("a", "a", {"q": 1}, 1),
        ("3", 3, {"q": 2}, 3),
        ("7", 7, {"q": 3}, 4),
    ]
    assert [r.seq for r in open_records(path).scan()] == [0, 1, 2]


def test_csv_records_use_the_header_and_physical_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('id,question\nq1,"two\nlines"\nq2,plain\n', encoding="utf-8")
    assert keys(open_records(path)) == [
        ("q1", "q1", {"question": "two\nlines"}, 2),
        ("q2", "q2", {"question": "plain"}, 4),
    ]


def test_custom_id_field_and_records_given_in_python() -> None:
    source = open_records([{"key": "x", "a": 1}, {"a": 2}], id_field="key")
    assert keys(source) == [("x", "x", {"a": 1}, 1), ("2", 2, {"a": 2}, 2)]
    assert "2 records given in Python" in source.label


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"id": 1}\n{"id": 2\n', "line 2 is not valid JSON"),
        ('{"id": 1}\n[1, 2]\n', "line 2 is a JSON list, not an object"),
        ('{"id": "a"}\n{"id": "b"}\n{"id": "a"}\n', "the record id 'a' was already used at line 1"),
        ('{"id": ""}\n', "a record id must be a non-empty string or an integer"),
        ('{"id": [1]}\n', "a record id must be a non-empty string or an integer"),
        ('{"id": true}\n', "a record id must be a non-empty string or an integer"),
    ],
)
def test_bad_jsonl_is_refused_with_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigurationError) as info:
        list(open_records(path).scan())
    assert message in str(info.value)
    assert str(path) in str(info.value)


def test_line_number_keys_collide_with_explicit_ids_clearly(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text('{"id": "2", "q": 1}\n{"q": 2}\n', encoding="utf-8")
    with pytest.raises(ConfigurationError, match="already used at line 1") as info:
        list(open_records(path).scan())
    assert info.value.code == "duplicate_id"


def test_bad_csv_row_and_header(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("id,q\n1,a,extra\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="line 2 has 3 values for 2 columns"):
        list(open_records(path).scan())
    path.write_text("id,id\n1,2\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match="empty or repeated column names"):
        list(open_records(path).scan())


def test_not_utf8_missing_file_unknown_format_and_wrong_type(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"id": 1}\n{"q": "\xff"}\n')
    with pytest.raises(ConfigurationError, match="not UTF-8"):
        list(open_records(path).scan())
    with pytest.raises(ConfigurationError, match="does not exist"):
        open_records(tmp_path / "missing.jsonl")
    with pytest.raises(ConfigurationError, match="cannot tell the format") as info:
        open_records(tmp_path / "data.txt")
    assert "--format" in (info.value.hint or "")
    with pytest.raises(ConfigurationError, match="iterable of dicts"):
        open_records({"id": 1})
    with pytest.raises(ConfigurationError, match="record 2 is a JSON int"):
        open_records([{"a": 1}, 5])


def test_format_override_and_input_hash_is_canonical(tmp_path: Path) -> None:
    path = tmp_path / "data.txt"
    path.write_text('{"b": 1, "a": [1, 2]}\n', encoding="utf-8")
    (rec,) = open_records(path, fmt="jsonl").scan()
    assert input_hash(rec.inputs) == input_hash({"a": [1, 2], "b": 1})
    assert input_hash({"a": 1}) != input_hash({"a": 2})


def _deep(levels: int) -> list[object]:
    top: list[object] = []
    cur = top
    for _ in range(levels):
        nxt: list[object] = []
        cur.append(nxt)
        cur = nxt
    return top


@pytest.mark.parametrize("value", [_deep(3000), 10**5000], ids=["nested-3000-deep", "int-5000-digits"])
def test_a_record_value_that_cannot_be_encoded_is_refused_naming_record_and_field(value: object) -> None:
    """Was a bare RecursionError / ValueError naming no record."""
    import stageflow

    p = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": 1}, writes=["y"])])
    with pytest.raises(ConfigurationError) as info:
        stageflow.run_batch(p, [{"id": "a", "x": 1}, {"id": "bad", "x": value}], progress=False)
    assert info.value.field == "x"
    assert "record 'bad'" in info.value.message


def test_a_jsonl_line_nested_too_deep_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.jsonl"
    path.write_text('{"id": "a", "x": 1}\n{"id": "b", "x": ' + "[" * 5000 + "]" * 5000 + "}\n")
    with pytest.raises(ConfigurationError, match="line 2 is nested deeper"):
        list(open_records(path).scan())
