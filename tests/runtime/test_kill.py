"""Exactly-once output under SIGKILL: a real ``stageflow batch`` process is killed at random
instants, 24 times, then finished; every id is in the output once, in input order, and the fake
LM's call log (written by the child processes) shows finished records never ran again."""

from __future__ import annotations

import json
import random
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from batchfake import failing, log_counts, pipeline_yaml

from conftest import stageflow_cmd, subprocess_env

N = 600
TRIALS = 24
FAIL_EVERY = 13


def snapshot(journal: Path) -> dict[str, str]:
    """Each record's status in the journal (empty before the journal has a plan)."""
    if not journal.exists():
        return {}
    con = sqlite3.connect(journal)
    try:
        return dict(con.execute("SELECT key, status FROM records"))
    except sqlite3.Error:
        return {}
    finally:
        con.close()


def finished(journal: Path) -> int:
    return sum(s in ("done", "failed") for s in snapshot(journal).values())


def test_sigkill_at_random_instants_then_resume_gives_exactly_once_output(tmp_path: Path) -> None:
    rng = random.Random(20261202)
    log = tmp_path / "calls.log"
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(pipeline_yaml(str(log), 0.02, FAIL_EVERY), encoding="utf-8")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"t-{i}", "text": f"t-{i}"}) + "\n" for i in range(N)))
    out, journal = tmp_path / "out.jsonl", tmp_path / "journal.sqlite"
    argv = stageflow_cmd("batch", str(pipe), str(data), "-o", str(out), "--journal", str(journal))
    argv += ["--concurrency", "4", "--allow-module", "batchfake", "--quiet"]
    env = subprocess_env()

    kills: list[tuple[set[str], dict[str, int], set[str]]] = []  # (finished, calls so far, running)
    for trial in range(TRIALS):
        before = finished(journal)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if trial % 3 == 2:  # anywhere from start-up (import, scan, plan) onwards
            time.sleep(rng.uniform(0.0, 1.5))
        else:  # while records are running: after this run finished one, plus a random delay
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline and finished(journal) <= before:
                time.sleep(0.003)
            time.sleep(rng.uniform(0.0, 0.08))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        states = snapshot(journal)
        kills.append(
            (
                {k for k, s in states.items() if s in ("done", "failed")},
                log_counts(str(log)),
                {k for k, s in states.items() if s == "running"},
            )
        )
        assert not out.exists() or len(out.read_text().splitlines()) == N  # never a partial output

    running_at_last_kill = kills[-1][2]
    assert sum(1 for _, _, running in kills if running) >= TRIALS // 3  # kills landed mid-run
    assert 0 < len(kills[-1][0]) < N  # the kills left work to resume

    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr  # records t-0, t-13, ... fail by design
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"t-{i}" for i in range(N)]
    for r in rows:
        if failing(r["id"], FAIL_EVERY):
            assert r["status"] == "error"
            assert r["error"]["stage_path"] == "stages[0]"
        else:
            assert r["outputs"] == {"answer": r["id"].upper()}

    calls = log_counts(str(log))
    assert set(calls) == {f"t-{i}" for i in range(N)}
    for finished_then, calls_then, _ in kills:  # finished records were never recomputed
        for key in finished_then:
            assert calls[key] == calls_then[key], key
    for key, n in calls.items():  # a record runs again only after a kill caught it in flight
        assert n <= 1 + sum(key in running for _, _, running in kills), key

    con = sqlite3.connect(journal)
    last_repeated = con.execute("SELECT repeated FROM runs ORDER BY id DESC LIMIT 1").fetchone()[0]
    attempts = dict(con.execute("SELECT key, attempts FROM records"))
    con.close()
    assert last_repeated == len(running_at_last_kill)
    assert all(calls[k] <= attempts[k] for k in calls)  # every LM call followed a journaled start
