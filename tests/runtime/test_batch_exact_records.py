"""A batch never reuses a result for a record that changed, never writes part of an output, and
never runs twice under two spellings of one journal (findings of an adversarial check)."""

from __future__ import annotations

import enum
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import stageflow
from stageflow.errors import ConfigurationError
from stageflow.runtime import JournalError
from stageflow.runtime.journal import Journal
from stageflow.runtime.records import input_hash


def _sum_pipeline() -> stageflow.SequentialPipeline:
    return stageflow.SequentialPipeline(
        [stageflow.stage(lambda arr: {"total": float(np.sum(arr))}, writes=["total"])]
    )


class SameRepr:
    def __init__(self, v: str) -> None:
        self.v = v

    def __repr__(self) -> str:
        return "SameRepr(...)"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (np.zeros(5000), np.where(np.arange(5000) == 2500, 7.0, 0.0)),  # an abridged repr
        (SameRepr("old"), SameRepr("new")),  # a constant repr
        ((1, 2), [1, 2]),  # JSON writes both as [1, 2]
        ({1: "a"}, {"1": "a"}),  # JSON writes both keys as "1"
    ],
    ids=["numpy", "constant-repr", "tuple-list", "int-key"],
)
def test_a_record_whose_content_changed_has_another_hash(first: Any, second: Any) -> None:
    assert input_hash({"v": first}) != input_hash({"v": second})
    assert input_hash({"v": first}) == input_hash({"v": first})


def test_plain_json_records_keep_the_hash_earlier_journals_have() -> None:
    import hashlib
    import json

    inputs = {"question": "q", "n": 1, "xs": [1.5, None, True], "meta": {"a": "b"}}
    text = json.dumps(inputs, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    assert input_hash(inputs) == hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def test_resuming_with_a_changed_array_is_refused_not_served_stale(tmp_path: Path) -> None:
    j = tmp_path / "j"
    first = stageflow.run_batch(
        _sum_pipeline(), [{"id": "x", "arr": np.zeros(5000)}], journal=j, progress=False
    )
    assert [r.outputs for r in first.rows()] == [{"total": 0.0}]
    changed = np.zeros(5000)
    changed[2500] = 7.0
    with pytest.raises(JournalError, match="changed"):
        stageflow.run_batch(_sum_pipeline(), [{"id": "x", "arr": changed}], journal=j, progress=False)


def test_an_input_with_no_stable_encoding_is_refused_naming_the_field(tmp_path: Path) -> None:
    import threading

    with pytest.raises(ConfigurationError, match="the field 'lock' holds a") as e:
        stageflow.run_batch(_sum_pipeline(), [{"id": "x", "lock": threading.Lock()}], journal=tmp_path / "j")
    assert e.value.field == "lock"


class Color(enum.Enum):
    RED = "red"


def test_outputs_are_written_whole_numpy_and_enums_included(tmp_path: Path) -> None:
    p = stageflow.SequentialPipeline(
        [
            stageflow.stage(
                lambda x: {"vec": np.arange(2000), "scalar": np.float32(0.5), "color": Color.RED},
                writes=["vec", "scalar", "color"],
            )
        ]
    )
    summary = stageflow.run_batch(p, [{"id": "a", "x": 1}], journal=tmp_path / "j", progress=False)
    (row,) = list(summary.rows())
    assert row.outputs == {"vec": list(range(2000)), "scalar": 0.5, "color": "red"}


def test_an_output_the_journal_cannot_hold_fails_its_record_naming_the_field(tmp_path: Path) -> None:
    p = stageflow.SequentialPipeline(
        [stageflow.stage(lambda x: {"ok": 1} if x == 1 else {"ok": object()}, writes=["ok"])]
    )
    summary = stageflow.run_batch(
        p, [{"id": "good", "x": 1}, {"id": "bad", "x": 2}], journal=tmp_path / "j", progress=False
    )
    rows = {r.id: r for r in summary.rows()}
    assert rows["good"].outputs == {"ok": 1}
    assert not rows["bad"].ok
    assert rows["bad"].error["code"] == "unwritable_output"
    assert "'ok'" in rows["bad"].error["message"]
    assert summary.failed == 1


def test_an_output_that_is_the_input_object_itself_is_in_the_row(tmp_path: Path) -> None:
    p = stageflow.SequentialPipeline(
        [stageflow.stage(lambda text: {"text": text.strip(), "n": len(text)}, writes=["text", "n"])]
    )
    summary = stageflow.run_batch(
        p,
        [{"id": "a", "text": "clean"}, {"id": "b", "text": " padded "}],
        journal=tmp_path / "j",
        progress=False,
    )
    assert [r.outputs for r in summary.rows()] == [{"text": "clean", "n": 5}, {"text": "padded", "n": 8}]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_a_journal_reached_through_a_symlink_is_locked_too(tmp_path: Path) -> None:
    real = tmp_path / "j.sqlite"
    link = tmp_path / "link.sqlite"
    with Journal(real):
        link.symlink_to(real)
        with pytest.raises(JournalError, match="in use by another batch run"):
            stageflow.run_batch(_sum_pipeline(), [{"id": "x", "arr": [1]}], journal=link, progress=False)


@pytest.mark.parametrize("damage", ["'not json'", "NULL"])
def test_a_damaged_row_in_the_journal_stops_the_output_naming_the_record(tmp_path: Path, damage: str) -> None:
    import sqlite3

    j, out = tmp_path / "j", tmp_path / "out.jsonl"
    p = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x + 1}, writes=["y"])])
    recs = [{"id": f"r{i}", "x": i} for i in range(3)]
    stageflow.run_batch(p, recs, journal=j, output=out, progress=False)
    before = out.read_text()
    con = sqlite3.connect(j)
    con.execute(f"UPDATE records SET outputs = {damage} WHERE key = 'r1'")
    con.commit()
    con.close()
    with pytest.raises(JournalError, match='the record "r1" has'):
        stageflow.run_batch(p, recs, journal=j, output=out, progress=False)
    assert out.read_text() == before  # the old file stays whole
