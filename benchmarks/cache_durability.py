"""Persistent stage cache: what a SIGKILL loses, and what a full write queue costs.

Run: ``python benchmarks/cache_durability.py`` (``--trials 15`` by default).

1. **Loss after SIGKILL.** A child process writes entries to a ``SQLiteStore`` and prints the
   index of every write once ``set()`` has returned (acknowledged). The parent kills it with
   SIGKILL at a random instant, then counts which acknowledged entries are in the database.
   Two write rates: a flood (as fast as ``set()`` returns: the queue stays full) and a paced
   writer (one entry per millisecond, a busy pipeline of cached function stages).
2. **A full queue: wait or write?** Producers flood a store whose queue holds 256 entries, with
   the two policies a full queue can have: the producer waits for the background writer
   (``wait``, the default) or commits its own write (``write``). Wall time and the slowest
   ``set()`` calls, side by side, 1 and 4 producer threads.
"""

from __future__ import annotations

import argparse
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import machine_note

CHILD = """
import os, sys, time
from stageflow.policies.stores import SQLiteStore
store = SQLiteStore(sys.argv[1])
pause = float(sys.argv[2])
i = 0
os.write(1, b"ready\\n")
while True:
    store.set(f"k{i}", {"i": i, "text": "x" * 200})
    os.write(1, b"%d\\n" % i)
    i += 1
    if pause:
        time.sleep(pause)
"""


def kill_trial(tmp: Path, pause: float, rng: random.Random) -> tuple[int, int, bool]:
    """``(acknowledged, lost, only_the_tail_lost)`` for one SIGKILL at a random instant."""
    db = tmp / f"kill-{rng.random():.12f}.db"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(db), str(pause)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"ready"
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read1(65536), b"")))
    reader.start()  # keep the pipe empty, so the child never blocks on printing
    time.sleep(rng.uniform(0.2, 1.2))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    reader.join()
    out = b"".join(chunks).split()
    acked = int(out[-1]) + 1 if out else 0
    with sqlite3.connect(db) as conn:
        present = {int(k[1:]) for (k,) in conn.execute("SELECT key FROM stageflow_cache")}
    lost = sorted(set(range(acked)) - present)
    tail_only = not lost or lost == list(range(lost[0], acked))
    return acked, len(lost), tail_only


def flood(policy: str, threads: int, n: int = 20_000) -> tuple[float, float, float]:
    """``(wall s, p99 set() µs, max set() µs)`` for ``n`` writes from ``threads`` producers."""
    from stageflow.policies.stores import SQLiteStore

    with tempfile.TemporaryDirectory() as d:
        store = SQLiteStore(Path(d) / "flood.db", max_pending=256)
        assert store._queue is not None
        store._queue.when_full = policy
        lat: list[float] = []
        lock = threading.Lock()

        def produce(t: int) -> None:
            mine = []
            for i in range(n // threads):
                t0 = time.perf_counter()
                store.set(f"{t}-{i}", {"i": i, "text": "x" * 200})
                mine.append(time.perf_counter() - t0)
            with lock:
                lat.extend(mine)

        t0 = time.perf_counter()
        workers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        store.flush()
        wall = time.perf_counter() - t0
        assert len(store) == n // threads * threads
        store.close()
    lat.sort()
    return wall, lat[int(len(lat) * 0.99)] * 1e6, lat[-1] * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=15)
    args = parser.parse_args()
    rng = random.Random(20261125)
    print(f"# Persistent cache durability ({machine_note()})\n")
    print(f"SIGKILL at a random instant (0.2-1.2 s into writing), {args.trials} trials per rate.\n")
    print(
        "| writer | acknowledged (median) | lost per trial (median / max) | trials losing only the newest |"
    )
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        for label, pause in (("flood (no pause)", 0.0), ("paced (1 entry / ms)", 0.001)):
            runs = [kill_trial(Path(d), pause, rng) for _ in range(args.trials)]
            acked = [a for a, _, _ in runs]
            lost = [x for _, x, _ in runs]
            tails = sum(t for _, _, t in runs)
            print(
                f"| {label} | {statistics.median(acked):.0f} | {statistics.median(lost):.0f} / {max(lost)} "
                f"| {tails}/{len(runs)} |"
            )
    print()
    print("A full write queue (256 entries), 20,000 writes:\n")
    print("| producers | policy | wall s | p99 set() µs | slowest set() µs |")
    print("|---|---|---|---|---|")
    for threads in (1, 4):
        for policy in ("wait", "write"):
            wall, p99, worst = flood(policy, threads)
            print(f"| {threads} | {policy} | {wall:.2f} | {p99:.0f} | {worst:.0f} |")


if __name__ == "__main__":
    main()
