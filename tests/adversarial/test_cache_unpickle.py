"""Issue 9, caching: reading a cache file cannot run code.

Today the SQLite store unpickles values, so a crafted row runs a command in the process that reads
it. The reproducer writes a malicious pickle over every stored value, then reads the cache the way
a pipeline does: nothing may run, the stage runs instead (a miss), and the user is warned.
"""

from __future__ import annotations

import pickle
import sqlite3
import warnings
from pathlib import Path
from typing import Any

import dspy

from stageflow import CachedStage, SequentialPipeline
from stageflow.policies.cache import CacheWarning
from stageflow.testing import FakeLM, call


class Exploit:
    """Unpickling this creates a marker file (any command could run instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.write_text, (self.marker, "pwned"))


def poison(db: Path, payload: bytes) -> int:
    """Overwrite every value column of every table with ``payload``; return the rows changed."""
    changed = 0
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]
            if "value" in columns:
                changed += conn.execute(f"UPDATE {table} SET value = ?", (payload,)).rowcount
    return changed


async def test_a_crafted_cache_row_runs_nothing(mode: str, tmp_path: Path) -> None:
    db = tmp_path / "cache.db"
    marker = tmp_path / "marker.txt"
    lm = FakeLM({"answer": "real"})
    writer = CachedStage(dspy.Predict("question -> answer"), persist_to=db)
    with dspy.context(lm=lm):
        await call(SequentialPipeline([writer]), mode, question="q")
    writer.cache.persistent.close()
    assert poison(db, pickle.dumps(Exploit(marker))) == 1

    reader = CachedStage(dspy.Predict("question -> answer"), persist_to=db)
    with warnings.catch_warnings(record=True) as caught, dspy.context(lm=lm):
        warnings.simplefilter("always")
        r = await call(SequentialPipeline([reader]), mode, question="q")
        again = await call(SequentialPipeline([reader]), mode, question="q")
    reader.cache.persistent.close()
    assert not marker.exists()
    assert r.answer == "real"
    assert lm.calls == 2  # the poisoned entry was a miss: the stage ran again
    assert [e.kind for e in again.run.events] == ["cache_hit"]  # from memory
    assert len([w for w in caught if issubclass(w.category, CacheWarning)]) == 1


def test_the_store_never_imports_pickle_for_values(tmp_path: Path) -> None:
    """Values on disk are a data format: text, not a pickle stream."""
    from stageflow import SQLiteStore

    store = SQLiteStore(tmp_path / "c.db")
    store.set("k", {"y": [1, (2, 3)], "z": b"\x00"})
    store.close()
    with sqlite3.connect(tmp_path / "c.db") as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        values = [
            v
            for t in tables
            if "value" in [c[1] for c in conn.execute(f"PRAGMA table_info({t})")]
            for (v,) in conn.execute(f"SELECT value FROM {t}")
        ]
    assert len(values) == 1
    assert isinstance(values[0], str)  # JSON text
    assert not values[0].startswith("\x80")  # not a pickle stream
