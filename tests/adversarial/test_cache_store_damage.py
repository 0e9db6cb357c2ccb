"""Issue 9, caching: a damaged or foreign database is a miss plus one warning, never a failed stage;
writes delayed by a lock are retried, never silently dropped; the write queue is bounded; pending
writes are flushed on normal exit and on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest

import stageflow
from stageflow import CachedStage, SequentialPipeline, SQLiteStore, stage
from stageflow.policies.cache import CacheWarning
from stageflow.testing import call


def counting() -> tuple[Callable[[int], dict[str, int]], list[int]]:
    calls: list[int] = stageflow.untracked([])

    def double(x: int) -> dict[str, int]:
        calls.append(x)
        return {"y": 2 * x}

    return double, calls


def not_sqlite(path: Path) -> Path:
    path.write_bytes(b"this is a text file, not a database\n" * 100)
    return path


def foreign_schema(path: Path) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices (total) VALUES (9.5)")
    return path


def old_pickle_schema(path: Path) -> Path:
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE cache (key TEXT PRIMARY KEY, value BLOB NOT NULL)")
        conn.execute("INSERT INTO cache VALUES ('k', x'80049500')")
    return path


def truncated(path: Path) -> Path:
    store = SQLiteStore(path)
    for i in range(300):
        store.set(f"k{i}", {"y": "x" * 200})
    store.close()
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def directory(path: Path) -> Path:
    path.mkdir()
    return path


def unwritable(path: Path) -> Path:
    if os.geteuid() == 0:  # root ignores file modes: a path nobody can create stands in for it
        return Path("/proc/self/stageflow-cache/c.db")
    path.parent.chmod(0o500)
    return path


DAMAGE = [not_sqlite, foreign_schema, old_pickle_schema, truncated, directory, unwritable]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__ for d in DAMAGE])
async def test_a_damaged_or_foreign_database_is_a_miss_and_one_warning(
    mode: str, tmp_path: Path, damage: Callable[[Path], Path]
) -> None:
    target = tmp_path / "sub"
    target.mkdir()
    db = damage(target / "cache.db")
    before = db.read_bytes() if db.is_file() else None
    fn, calls = counting()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cached = CachedStage(stage(fn, writes=["y"]), persist_to=db)
            p = SequentialPipeline([cached])
            ys = [(await call(p, mode, x=x)).y for x in (1, 1, 2, 1)]
            cached.cache.persistent.flush()
            stats = cached.get_cache_stats()
            cached.cache.persistent.close()
    finally:
        target.chmod(0o700)
    assert ys == [2, 2, 4, 2]
    assert calls == [1, 2]  # memory caching still works
    mine = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert len(mine) == 1, [str(w.message) for w in mine]
    assert str(db) in str(mine[0].message)
    assert stats["persistent"]["available"] is False
    if before is not None and damage is not truncated:
        assert db.read_bytes() == before  # a foreign file is never modified


async def test_a_database_damaged_while_open_is_a_miss_and_one_warning(mode: str, tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    fn, _ = counting()
    cached = CachedStage(stage(fn, writes=["y"]), cache_size=1, persist_to=db)
    p = SequentialPipeline([cached])
    await call(p, mode, x=1)
    cached.cache.persistent.flush()
    for suffix in ("", "-wal", "-shm"):
        f = Path(str(db) + suffix)
        if f.exists():
            f.write_bytes(b"\x00garbage" * 512)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [(await call(p, mode, x=x)).y for x in (2, 1, 2, 1)]
        cached.cache.persistent.flush()
    cached.cache.persistent.close()
    assert ys == [4, 2, 4, 2]
    assert len([w for w in caught if issubclass(w.category, CacheWarning)]) == 1


# -- locks: retried with backoff, never silently dropped --------------------------------------------


def hold_write_lock(db: Path, seconds: float, started: threading.Event) -> threading.Thread:
    def hold() -> None:
        conn = sqlite3.connect(db, timeout=30, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        started.set()
        time.sleep(seconds)
        conn.execute("COMMIT")
        conn.close()

    t = threading.Thread(target=hold)
    t.start()
    return t


@pytest.mark.integration
def test_a_write_delayed_by_a_long_lock_is_retried_not_dropped(tmp_path: Path) -> None:
    """Another process holds the write lock for longer than SQLite's own busy timeout (5 s)."""
    db = tmp_path / "c.db"
    store = SQLiteStore(db)
    started = threading.Event()
    holder = hold_write_lock(db, 5.5, started)
    started.wait()
    store.set("k", {"y": 1})
    holder.join()
    store.flush()
    assert store.get("k") == (True, {"y": 1})
    stats = store.stats()
    assert stats["lost_writes"] == 0
    store.close()


def test_a_lock_is_retried_with_backoff_until_released(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    store = SQLiteStore(db, lock_timeout=10.0)
    started = threading.Event()
    holder = hold_write_lock(db, 0.6, started)
    started.wait()
    for i in range(5):
        store.set(f"k{i}", i)
    holder.join()
    store.flush()
    assert [store.get(f"k{i}") for i in range(5)] == [(True, i) for i in range(5)]
    stats = store.stats()
    assert stats["write_retries"] >= 1
    assert stats["lost_writes"] == 0
    store.close()


def test_writes_that_finally_fail_are_counted_and_warned_about(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    store = SQLiteStore(db, lock_timeout=0.3)
    started = threading.Event()
    holder = hold_write_lock(db, 1.5, started)
    started.wait()
    for i in range(3):
        store.set(f"k{i}", i)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store.flush()
        store.flush()
    holder.join()
    assert store.stats()["lost_writes"] == 3
    mine = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert len(mine) == 1
    assert "3" in str(mine[0].message)
    store.close()


def test_the_write_queue_is_bounded(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    store = SQLiteStore(db, lock_timeout=30.0, max_pending=8)
    started = threading.Event()
    holder = hold_write_lock(db, 1.0, started)
    started.wait()
    seen: list[int] = []
    done = threading.Event()

    def produce() -> None:
        for i in range(40):
            store.set(f"k{i}", i)
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    while not done.wait(0.01):
        seen.append(store.stats()["pending"])
    producer.join()
    holder.join()
    store.flush()
    assert max(seen) <= 8
    assert len(store) == 40
    store.close()


# -- exit: atexit and SIGTERM flush pending writes ----------------------------------------------------

EXIT_CHILD = textwrap.dedent(
    """
    import os, signal, sqlite3, sys, time
    from stageflow import SQLiteStore

    db, how = sys.argv[1], sys.argv[2]
    if how == "own-handler-before":
        def mine(signum, frame):
            open(db + ".handler", "w").write("ran")
            sys.exit(3)
        signal.signal(signal.SIGTERM, mine)
    store = SQLiteStore(db)
    if how == "own-handler-after":
        def mine(signum, frame):
            open(db + ".handler", "w").write("ran")
            sys.exit(4)
        signal.signal(signal.SIGTERM, mine)
    for i in range(200):
        store.set(f"k{i}", {"i": i})
    print("queued", flush=True)
    if how == "exit":
        sys.exit(0)
    time.sleep(60)
    """
)


def run_exit_child(tmp_path: Path, how: str) -> tuple[int, int, bool]:
    db = tmp_path / "c.db"
    script = tmp_path / "child.py"
    script.write_text(EXIT_CHILD)
    SQLiteStore(db).close()  # create the schema, so the parent can lock it
    started = threading.Event()
    holder = hold_write_lock(db, 1.0, started)  # nothing can be committed before the signal
    started.wait()
    proc = subprocess.Popen(
        [sys.executable, str(script), str(db), how], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "queued"
    if how != "exit":
        proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    holder.join()
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        rows = sum(
            conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
            for t in tables
            if "value" in [c[1] for c in conn.execute(f"PRAGMA table_info({t})")]
        )
    return code, rows, Path(str(db) + ".handler").exists()


@pytest.mark.integration
def test_pending_writes_are_flushed_on_normal_exit(tmp_path: Path) -> None:
    assert run_exit_child(tmp_path, "exit") == (0, 200, False)


@pytest.mark.integration
def test_pending_writes_are_flushed_on_sigterm(tmp_path: Path) -> None:
    assert run_exit_child(tmp_path, "default") == (-signal.SIGTERM, 200, False)


@pytest.mark.integration
def test_sigterm_flushes_then_chains_to_the_programs_own_handler(tmp_path: Path) -> None:
    assert run_exit_child(tmp_path, "own-handler-before") == (3, 200, True)


@pytest.mark.integration
def test_a_handler_installed_later_still_runs_and_exit_flushes(tmp_path: Path) -> None:
    assert run_exit_child(tmp_path, "own-handler-after") == (4, 200, True)


def test_no_signal_handler_without_a_persistent_store() -> None:
    script = textwrap.dedent(
        """
        import json, signal
        import stageflow
        before = signal.getsignal(signal.SIGTERM)
        p = stageflow.SequentialPipeline([stageflow.CachedStage(stageflow.stage(lambda x: {"y": x},
                                                                             writes=["y"]))])
        p(x=1)
        print(json.dumps(signal.getsignal(signal.SIGTERM) == before))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) is True
