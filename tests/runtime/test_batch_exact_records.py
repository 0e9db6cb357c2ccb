"""A batch never reuses a result for a record that changed, never writes part of an output, and
never runs twice under two spellings of one journal (findings of an adversarial check)."""

from __future__ import annotations

import dataclasses
import enum
import os
import subprocess
import sys
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


@dataclasses.dataclass
class Tagged:
    tag: str


def _with_extra(value: str) -> Tagged:
    t = Tagged("t")
    t.extra = value  # type: ignore[attr-defined]
    return t


class Bag:
    def __init__(self, words: set[str]) -> None:
        self.words = words


@dataclasses.dataclass
class Holder:
    counts: dict[str, int]


class Cfg(dict):  # type: ignore[type-arg]
    pass


class Label(str):
    __slots__ = ()


class Vec(list):  # type: ignore[type-arg]
    pass


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (Cfg(mode="old"), Cfg(mode="new")),  # subclasses of builtins: the content is not in __dict__
        (Label("old"), Label("new")),
        (Vec([1]), Vec([2])),
        (_with_extra("old"), _with_extra("new")),  # an attribute besides the dataclass's fields
        (np.zeros(5000), np.where(np.arange(5000) == 2500, 7.0, 0.0)),  # an abridged repr
        (SameRepr("old"), SameRepr("new")),  # a constant repr
        ((1, 2), [1, 2]),  # JSON writes both as [1, 2]
        ({1: "a"}, {"1": "a"}),  # JSON writes both keys as "1"
    ],
    ids=[
        "dict-subclass",
        "str-subclass",
        "list-subclass",
        "dataclass-extra",
        "numpy",
        "constant-repr",
        "tuple-list",
        "int-key",
    ],
)
def test_a_record_whose_content_changed_has_another_hash(first: Any, second: Any) -> None:
    assert input_hash({"v": first}) != input_hash({"v": second})
    assert input_hash({"v": first}) == input_hash({"v": first})


_HASH_IN_A_FRESH_PROCESS = """
import dataclasses, sys
sys.path.insert(0, {tests!r})
from test_batch_exact_records import Bag, Holder
from stageflow.runtime.records import input_hash
words = [f"w{{i}}" for i in range(20)]
record = {{"bag": Bag(set(words)), "dc": Holder({{w: 1 for w in set(words)}}), "fs": frozenset(words)}}
print(input_hash(record))
"""


def test_objects_holding_sets_and_dicts_hash_alike_in_every_process() -> None:
    code = _HASH_IN_A_FRESH_PROCESS.format(tests=str(Path(__file__).parent))
    hashes = set()
    for seed in ("1", "2", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        hashes.add(out.stdout.strip())
    assert len(hashes) == 1


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
    assert rows["bad"].error["stage_path"] == "stages[0]"  # the stage that wrote it (was null)
    assert summary.failed == 1


def test_an_unwritable_renamed_output_names_the_stage_that_wrote_it(tmp_path: Path) -> None:
    p = stageflow.SequentialPipeline(
        [stageflow.Stage(lambda x: {"blob": object()}, outputs={"blob": "thing"})]
    )
    (row,) = list(
        stageflow.run_batch(p, [{"id": "a", "x": 1}], journal=tmp_path / "j", progress=False).rows()
    )
    assert row.error["code"] == "unwritable_output"
    assert "'thing'" in row.error["message"]
    assert row.error["stage_path"] == "stages[0]"  # (was null for a renamed output)


def test_a_plain_dspy_module_output_that_is_its_input_object_is_in_the_row(tmp_path: Path) -> None:
    import dspy

    class Clean(dspy.Module):  # type: ignore[misc]
        def forward(self, text: str) -> dspy.Prediction:
            return dspy.Prediction(text=text.strip(), n=len(text))

    summary = stageflow.run_batch(
        Clean(),
        [{"id": "a", "text": "clean"}, {"id": "b", "text": " padded "}],
        journal=tmp_path / "j",
        progress=False,
    )
    assert [r.outputs for r in summary.rows()] == [{"text": "clean", "n": 5}, {"text": "padded", "n": 8}]


@pytest.mark.parametrize("keys", [(1, "1"), (True, "true"), (None, "null")])
def test_an_output_dict_whose_keys_json_would_merge_fails_its_record(
    tmp_path: Path, keys: tuple[Any, str]
) -> None:
    p = stageflow.SequentialPipeline(
        [stageflow.stage(lambda x: {"y": {keys[0]: "a", keys[1]: "b"}}, writes=["y"])]
    )
    (row,) = list(
        stageflow.run_batch(p, [{"id": "a", "x": 1}], journal=tmp_path / "j", progress=False).rows()
    )
    assert not row.ok
    assert row.error["code"] == "unwritable_output"
    assert "one key in JSON" in row.error["message"]


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


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_a_journal_reached_through_another_name_is_locked_too(tmp_path: Path, link: str) -> None:
    real = tmp_path / "j.sqlite"
    other = tmp_path / "other.sqlite"
    with Journal(real):
        if link == "symlink":
            other.symlink_to(real)
        else:
            os.link(real, other)
        with pytest.raises(JournalError, match="in use by another batch run"):
            stageflow.run_batch(_sum_pipeline(), [{"id": "x", "arr": [1]}], journal=other, progress=False)


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


def test_a_second_journal_on_the_same_file_in_one_process_leaves_the_first_one_s_locks(
    tmp_path: Path,
) -> None:
    """Refused before it opens the file: closing a descriptor of it would drop the SQLite locks of
    the journal in use, and an outside reader would then delete its write-ahead log."""
    import sqlite3

    path = tmp_path / "j.sqlite"
    with Journal(path) as first:
        first.con.execute("CREATE TABLE IF NOT EXISTS probe (x)")
        first.con.execute("INSERT INTO probe VALUES (1)")
        with pytest.raises(JournalError, match="in use by another batch run"):
            Journal(path)
        reader = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('select 1'); c.close()",
                str(path),
            ],
            check=True,
        )
        assert reader.returncode == 0
        assert (tmp_path / "j.sqlite-wal").exists()  # still the live journal's
        first.con.execute("INSERT INTO probe VALUES (2)")
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM probe").fetchone()[0] == 2
    con.close()
