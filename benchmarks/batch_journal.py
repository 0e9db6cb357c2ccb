"""Where a batch of ``Predict`` stages loses to 32 bare threads: the journal, measured in place.

Same workload as ``benchmarks/batch.py`` (1,000 records × 3 ``Predict`` stages × 20 ms, 32 in flight,
``stageflow.testing.FakeLM``), three variants side by side in rotated order:

- the thread reference: 32 threads calling the pipeline, no runner, no journal;
- ``run_batch`` as it is (SQLite journal, group commit by the workers);
- ``run_batch`` with a journal writer that does nothing (what the journal costs, by difference).

For the real journal it also reports how long each record waited on it (the start commit that
must land before the record runs, and the commit its result rides on) and the CPU the commits took
on the committing threads. Run: ``PYTHONPATH=src python benchmarks/batch_journal.py [--reps 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import stageflow
import stageflow.runtime.journal as journal_mod
import stageflow.runtime.writer as writer_mod

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch import CONC, IDEAL, N, fake_lm, predict_pipeline, thread_reference

STATS = {"wait": 0.0, "commit_cpu": 0.0, "commits": 0}


class _NoJournal:
    """A writer that commits nothing (the runner's own cost without the journal)."""

    def __init__(self) -> None:
        self.error = None
        self.commits = 0

    def start(self, seqs: Any, finished: Any = ()) -> None:
        return None

    def finish(self, seq: int, outcome: Any) -> None:
        return None

    def close(self) -> None:
        return None


def _instrument() -> None:
    commit, apply = writer_mod.JournalWriter._commit, writer_mod.JournalWriter._apply

    def timed_commit(self: Any, items: Any) -> None:
        c = time.thread_time()
        commit(self, items)
        STATS["commit_cpu"] += time.thread_time() - c
        STATS["commits"] += 1

    def timed_apply(self: Any, item: Any) -> None:
        w = time.perf_counter()
        apply(self, item)
        STATS["wait"] += time.perf_counter() - w

    writer_mod.JournalWriter._commit = timed_commit  # type: ignore[method-assign]
    writer_mod.JournalWriter._apply = timed_apply  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=3)
    reps = parser.parse_args().reps
    tmp = Path(tempfile.mkdtemp())
    program, lm = predict_pipeline(), fake_lm()
    questions = [{"id": i, "question": f"q{i}"} for i in range(N)]
    counter = iter(range(10**6))
    real_writer = journal_mod.Journal.writer

    def pool() -> None:
        thread_reference(program, lm, questions)

    def batch() -> None:
        stageflow.run_batch(
            program, questions, lm=lm, journal=tmp / f"j{next(counter)}", concurrency=CONC, progress=False
        )

    def batch_no_journal() -> None:
        journal_mod.Journal.writer = lambda self, run_id: _NoJournal()  # type: ignore[assignment,method-assign,misc,return-value]
        try:
            batch()
        finally:
            journal_mod.Journal.writer = real_writer  # type: ignore[method-assign]

    _instrument()
    variants = {
        "thread reference: 32 threads × pipeline call": pool,
        "run_batch (SQLite journal)": batch,
        "run_batch, journal writer doing nothing": batch_no_journal,
    }
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    waits: list[tuple[float, float, float]] = []
    names = list(variants)
    for r in range(reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            STATS.update(wait=0.0, commit_cpu=0.0, commits=0)
            w, c = time.perf_counter(), time.process_time()
            variants[name]()
            wall, cpu = time.perf_counter() - w, time.process_time() - c
            rows[name].append((IDEAL / wall, cpu / (N * 3) * 1e6))
            if name == "run_batch (SQLite journal)":
                waits.append((STATS["wait"] / N * 1e3, STATS["commit_cpu"] / N * 1e6, STATS["commits"]))
    print(f"# {N} records × 3 Predict stages × 20 ms, {CONC} in flight; ideal {IDEAL:.3f} s; {reps} reps")
    print(f"# load average {os.getloadavg()[0]:.2f} at the end\n")
    print("| variant | ratio to ideal (median) | all runs | CPU µs per stage call (median) |")
    print("|---|---|---|---|")
    for name, vals in rows.items():
        ratios = [v[0] for v in vals]
        print(
            f"| {name} | {statistics.median(ratios):.2f} | {', '.join(f'{x:.2f}' for x in ratios)} | "
            f"{statistics.median(v[1] for v in vals):.0f} |"
        )
    print()
    print("| journal, per record | median |")
    print("|---|---|")
    print(f"| time a record waited on the journal (ms) | {statistics.median(w[0] for w in waits):.1f} |")
    print(
        f"| CPU of its commits on the committing thread (µs) | {statistics.median(w[1] for w in waits):.0f} |"
    )
    print(f"| commits per batch | {statistics.median(w[2] for w in waits):.0f} |")


if __name__ == "__main__":
    main()
