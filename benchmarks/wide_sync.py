"""A sync ``ForEach`` of 512 sleeping function stages on threads, by failure policy, beside a
long-lived thread pool mapping the same sleeps; and how many full collections landed in each
variant's repetitions (to tell the collector's share from the engine's).

Run: ``python benchmarks/wide_sync.py [--n 512] [--reps 15] [--freeze]`` (``--freeze``: ``gc.freeze()``
after the warm-up, so a full collection no longer walks the objects the imports made). Prints wall
medians, the ratio to ``pool.map(time.sleep)`` and process CPU per branch.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from stageflow import ForEach, stage

LAT = 0.02


def work(x: int) -> dict[str, int]:
    time.sleep(LAT)
    return {"y": x}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--freeze", action="store_true")
    args = parser.parse_args()
    pool = ThreadPoolExecutor(512)
    xs = list(range(args.n))
    fail_fast = ForEach(stage(work, writes=["y"]), over="xs", item="x", collect="ys")
    collect = ForEach(stage(work, writes=["y"]), over="xs", item="x", collect="ys", on_error="collect")
    variants: dict[str, Callable[[], Any]] = {
        "pool.map(time.sleep)": lambda: list(pool.map(lambda _: time.sleep(LAT), xs)),
        "pool.map(the stage function)": lambda: list(pool.map(work, xs)),
        "ForEach, fail_fast (default)": lambda: fail_fast(xs=xs),
        'ForEach, on_error="collect"': lambda: collect(xs=xs),
    }
    for run in variants.values():
        run()
        run()
    if args.freeze:
        gc.freeze()
    current: list[str] = [""]
    full = dict.fromkeys(variants, 0)

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            full[current[0]] += 1

    gc.callbacks.append(count)
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.reps):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            current[0] = name
            c0, t0 = time.process_time(), time.perf_counter()
            variants[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    gc.callbacks.remove(count)
    ref = statistics.median(wall[names[0]])
    head = f"{args.n} × {LAT * 1000:.0f} ms sleeps (reps={args.reps}, freeze={args.freeze})"
    print(f"# sync fan-out of {head}\n")
    print("| variant | wall ms | / pool.map(time.sleep) | CPU µs per branch | full collections |")
    print("|---|---|---|---|---|")
    for name in names:
        w = statistics.median(wall[name])
        c = statistics.median(cpu[name]) / args.n * 1e6
        print(f"| {name} | {w * 1e3:.1f} | {w / ref:.3f} | {c:.1f} | {full[name]} |")


if __name__ == "__main__":
    main()
