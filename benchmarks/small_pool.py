"""Sync fan-outs on a small shared pool (``stageflow.configure(max_threads=N)``), by failure policy:
a flat ``ForEach`` of ten 20 ms ``def`` stages called sync and awaited with ``max_threads`` 1 and 4,
and three nested ``ForEach``es of 16 × 16 × 16 leaves of 10 ms on 8 threads. Under ``fail_fast``
the calling thread only watches while workers run; when the workers it hands out find the pool
full, it runs branches itself (``collect`` lets it work from the start).

Run: ``python benchmarks/small_pool.py [--nested-width 16]``. Prints wall seconds and the ideal
(the work divided over the threads that can run it).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Callable
from typing import Any

import stageflow


def _flat(policy: str) -> stageflow.ForEach:
    def work(x: int) -> dict[str, int]:
        time.sleep(0.02)
        return {"y": x}

    return stageflow.ForEach(
        stageflow.stage(work, writes=["y"]), over="xs", item="x", collect="ys", on_error=policy
    )


def _nested(policy: str) -> stageflow.ForEach:
    def leaf(x: int) -> dict[str, int]:
        time.sleep(0.01)
        return {"y": x}

    inner = stageflow.ForEach(
        stageflow.stage(leaf, writes=["y"]), over="xs", item="x", collect="ys", on_error=policy
    )
    mid = stageflow.ForEach(inner, over="rows", item="xs", collect={"ys": "grid"}, on_error=policy)
    return stageflow.ForEach(mid, over="blocks", item="rows", collect={"grid": "cube"}, on_error=policy)


def _timed(run: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    run()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nested-width", type=int, default=16)
    args = parser.parse_args()
    w = args.nested_width
    before = stageflow.get_config()["max_threads"]
    print("| case | threads | ideal s | fail_fast sync | fail_fast acall | collect sync | collect acall |")
    print("|---|---|---|---|---|---|---|")
    try:
        for threads in (1, 4):
            stageflow.configure(max_threads=threads)
            cells = []
            for policy in ("fail_fast", "collect"):
                each = _flat(policy)
                xs = list(range(10))
                cells.append(_timed(lambda each=each, xs=xs: each(xs=xs)))
                cells.append(_timed(lambda each=each, xs=xs: asyncio.run(each.acall(xs=xs))))
            ideal = 10 * 0.02 / (threads + 1)  # (the pool's threads and the caller)
            row = " | ".join(f"{c:.2f}" for c in cells)
            print(f"| flat ForEach, 10 × 20 ms | {threads} | {ideal:.2f} | {row} |")
        stageflow.configure(max_threads=8)
        blocks = [[list(range(w))] * w] * w
        cells = []
        for policy in ("fail_fast", "collect"):
            each = _nested(policy)
            cells.append(_timed(lambda each=each: each(blocks=blocks)))
            cells.append(_timed(lambda each=each: asyncio.run(each.acall(blocks=blocks))))
        ideal = w**3 * 0.01 / 8
        row = " | ".join(f"{c:.2f}" for c in cells)
        print(f"| nested ForEach ×3, {w}³ × 10 ms | 8 | {ideal:.2f} | {row} |")
    finally:
        stageflow.configure(max_threads=before)


if __name__ == "__main__":
    main()
