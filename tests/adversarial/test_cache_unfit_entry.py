"""Issue 9, caching (follow-up): a persistent entry that cannot be the stage's output (valid format,
but without a declared field, or not a record at all) is a miss plus one ``CacheWarning``; the
stage runs and its output replaces the entry. Before the fix it failed the stage with a
``ContractError``.
"""

from __future__ import annotations

import json
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import dspy
import pytest

from stageflow import CachedStage, SequentialPipeline, Stage, stage
from stageflow.policies.cache import CacheWarning, output_problem
from stageflow.testing import FakeLM, call

FORGED = {
    "missing-field": {"$t": "dict", "v": [["z", 1]]},  # 'y' is missing
    "not-a-record": [1, 2],
    "bare-number": 7,
}


def forge(db: Path, value: Any) -> None:
    """Replace every stored value with ``value`` (typed JSON the codec reads without complaint)."""
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE stageflow_cache SET value = ?", (json.dumps({"stageflow": 1, "value": value}),))


def stored_values(db: Path) -> list[Any]:
    with sqlite3.connect(db) as conn:
        return [json.loads(v)["value"] for (v,) in conn.execute("SELECT value FROM stageflow_cache")]


def plus_one(x: int) -> dict[str, int]:
    return {"y": x + 1, "z": x}


def ran(result: Any) -> bool:
    """Whether the stage ran (a miss) rather than being answered from the cache."""
    return [e.kind for e in result.run.events] != ["cache_hit"]


async def run_fresh(db: Path, mode: str) -> Any:
    """A new CachedStage on ``db`` (as a new process would build it), run once."""
    cached = CachedStage(stage(plus_one, writes=["y", "z"]), persist_to=db)
    result = await call(SequentialPipeline([cached]), mode, x=1)
    cached.cache.persistent.flush()
    return result, cached


@pytest.mark.parametrize("forged", list(FORGED.values()), ids=list(FORGED))
async def test_an_entry_without_the_declared_output_is_a_miss_and_one_warning(
    mode: str, tmp_path: Path, forged: Any
) -> None:
    db = tmp_path / "c.db"
    first, _ = await run_fresh(db, mode)
    assert ran(first)
    forge(db, forged)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result, cached = await run_fresh(db, mode)
        memory_hit = await call(SequentialPipeline([cached]), mode, x=1)  # no second warning
    cache_warnings = [str(w.message) for w in record if issubclass(w.category, CacheWarning)]
    assert len(cache_warnings) == 1
    assert "cannot be this stage's output" in cache_warnings[0]
    assert result.y == 2
    assert ran(result)
    assert memory_hit.y == 2
    assert not ran(memory_hit)
    stats = cached.cache.persistent.stats()
    assert (stats["hits"], stats["bad_entries"]) == (0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        repaired, _ = await run_fresh(db, mode)  # the fresh output replaced the row
    assert repaired.y == 2
    assert not ran(repaired)


async def test_renamed_outputs_are_checked_under_the_stages_own_names(mode: str, tmp_path: Path) -> None:
    db = tmp_path / "c.db"

    def build() -> SequentialPipeline:
        inner = stage(plus_one, writes=["y", "z"])
        return SequentialPipeline([Stage(inner, outputs={"y": "total"}, cache=str(db))])

    writer = build()
    first = await call(writer, mode, x=1)
    assert first.total == 2
    writer.stages[0].policy.cache.persistent.flush()
    again = await call(build(), mode, x=1)  # a fitting entry: a hit, no warning
    assert again.total == 2
    assert not ran(again)
    forge(db, {"$t": "dict", "v": [["total", 5], ["z", 1]]})  # the state's name, not the stage's
    with pytest.warns(CacheWarning, match="declared output 'y'"):
        third = await call(build(), mode, x=1)
    assert third.total == 2
    assert ran(third)


async def test_a_standalone_cached_stage_checks_entries_too(mode: str, tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    lm = FakeLM({"answer": "A"})
    with dspy.context(lm=lm):
        cached = CachedStage(dspy.Predict("question -> answer"), persist_to=db)
        await call(cached, mode, question="q")
        cached.cache.persistent.flush()
        forge(db, {"$t": "dict", "v": [["other", "x"]]})
        fresh = CachedStage(dspy.Predict("question -> answer"), persist_to=db)
        with pytest.warns(CacheWarning, match="declared output 'answer'"):
            out = await call(fresh, mode, question="q")
    assert out.answer == "A"
    assert lm.calls == 2
    fresh.cache.persistent.flush()
    assert stored_values(db)[0]["$t"] == "prediction" or "answer" in json.dumps(stored_values(db)[0])


def test_output_problem_accepts_what_a_stage_may_return() -> None:
    assert output_problem({"y": 1, "extra": 2}, ["y"]) is None
    assert output_problem(dspy.Prediction(y=1), ["y"]) is None
    assert output_problem(5, ["y"], single=True) is None  # a function stage's bare single value
    assert output_problem({"y": 1}, ["y"], single=True) is None
    assert output_problem({"z": 1}, ["y"], single=True) is not None
    assert output_problem([1, 2], ["y"], single=True) is None  # a bare list is a valid single output
    assert output_problem({"a": 1}, None) is None  # undeclared outputs: any record
    assert output_problem([1], None) is not None
    assert output_problem({1: "x"}, None) is not None  # field names are strings
