"""Where full collections land in the wide table's rotation at N = 2,048: ``asyncio.gather`` of
sleeps, ``ForEach.acall`` of an async stage, a long-lived ``ThreadPoolExecutor(512)`` mapping sleeps
and a sync ``ForEach`` of a ``def`` stage, 15 rotated rounds. Prints each variant's median and mean
wall (ms), how many of its repetitions a full collection started in, and the ``acall`` / ``gather``
ratio of medians (the ``fanout.py --wide-only`` async row).

Run: ``python benchmarks/wide_rotation_gc.py [--freeze]`` (``--freeze``: ``gc.freeze()`` after the
warm-up, so a full collection no longer walks the heap the imports made).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import stageflow

N = 2048
LAT = 0.02


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--freeze", action="store_true")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    items = list(range(N))
    pool = ThreadPoolExecutor(512)
    loop = asyncio.new_event_loop()

    async def gather() -> None:
        await asyncio.gather(*[asyncio.sleep(LAT) for _ in items])

    def sync_stage(x: int) -> dict[str, int]:
        time.sleep(LAT)
        return {"y": x}

    async def async_stage(x: int) -> dict[str, int]:
        await asyncio.sleep(LAT)
        return {"y": x}

    fe_sync = stageflow.ForEach(stageflow.stage(sync_stage, writes=["y"]), over="xs", item="x", collect="ys")
    fe_async = stageflow.ForEach(
        stageflow.stage(async_stage, writes=["y"]), over="xs", item="x", collect="ys"
    )
    variants: dict[str, Callable[[], Any]] = {
        "asyncio.gather(asyncio.sleep)": lambda: loop.run_until_complete(gather()),
        "ForEach.acall, async stage": lambda: loop.run_until_complete(fe_async.acall(xs=items)),
        "ThreadPoolExecutor(512).map(time.sleep)": lambda: list(pool.map(lambda _: time.sleep(LAT), items)),
        "ForEach, sync stage": lambda: fe_sync(xs=items),
    }
    for run in variants.values():
        run()
    if args.freeze:
        gc.freeze()
    current = [""]
    full = dict.fromkeys(variants, 0)

    def count(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            full[current[0]] += 1

    gc.callbacks.append(count)
    wall: dict[str, list[float]] = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            current[0] = name
            t0 = time.perf_counter()
            variants[name]()
            wall[name].append(time.perf_counter() - t0)
    gc.callbacks.remove(count)
    print(f"# N = {N} × {LAT * 1000:.0f} ms, {args.rounds} rotated rounds, freeze={args.freeze}\n")
    print("| variant | median ms | mean ms | repetitions a full collection started in |")
    print("|---|---|---|---|")
    for name in names:
        w = wall[name]
        print(
            f"| {name} | {statistics.median(w) * 1e3:.1f} | {statistics.mean(w) * 1e3:.1f} | {full[name]} |"
        )
    ratio = statistics.median(wall[names[1]]) / statistics.median(wall[names[0]])
    print(f"\nForEach.acall / asyncio.gather (medians): {ratio:.3f}")
    loop.close()
    pool.shutdown()


if __name__ == "__main__":
    main()
