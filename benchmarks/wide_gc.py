"""Why a 2,048-wide ``ForEach.acall`` falls behind ``asyncio.gather``: the cyclic garbage collector.

Each fan-out branch keeps a few container objects alive until the fan-out ends; at 2,048 branches
they push the collector into full (generation 2) collections, and each of those walks every object
of the process — DSPy, pydantic and LiteLLM's included. ``gc.freeze()`` after start-up moves the
objects that exist then out of the collector's way, so a full collection only walks what is new.

Run: ``PYTHONPATH=src python benchmarks/wide_gc.py`` — one fresh interpreter per collector setting
(the setting is process-wide), the same fan-out and reference in each, medians of 7.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import subprocess
import sys
import time

WIDTHS = (512, 2048)
LATENCY = 0.02
SETTINGS = ("default", "gc.freeze() after imports", "gc.disable()")


def _child(width: int, setting: str) -> None:
    import stageflow

    async def item(x: int) -> dict[str, int]:
        await asyncio.sleep(LATENCY)
        return {"y": x}

    each = stageflow.ForEach(
        stageflow.stage(item, writes=["y"]), over="xs", item="x", collect="ys", max_concurrency=width
    )

    async def reference() -> None:
        await asyncio.gather(*[item(x) for x in range(width)])

    loop = asyncio.new_event_loop()
    xs = list(range(width))
    if setting == SETTINGS[1]:
        gc.freeze()
    elif setting == SETTINGS[2]:
        gc.disable()
    ours, ref = [], []
    for _ in range(7):
        t = time.perf_counter()
        loop.run_until_complete(each.acall(xs=xs))
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        loop.run_until_complete(reference())
        ref.append(time.perf_counter() - t)
    print(f"{statistics.median(ours) / LATENCY:.2f} {statistics.median(ref) / LATENCY:.2f}")


def main() -> None:
    if len(sys.argv) == 3:
        _child(int(sys.argv[1]), sys.argv[2])
        return
    import os

    print(f"load average {os.getloadavg()[0]:.2f}; wall / ideal (20 ms), medians of 7\n")
    print("| collector | width | ForEach.acall | asyncio.gather | ratio |")
    print("|---|---|---|---|---|")
    for setting in SETTINGS:
        for width in WIDTHS:
            out = subprocess.run(
                [sys.executable, __file__, str(width), setting], capture_output=True, text=True, check=True
            )
            ours, ref = map(float, out.stdout.split())
            print(f"| {setting} | {width} | {ours:.2f}× | {ref:.2f}× | {ours / ref:.2f} |")


if __name__ == "__main__":
    main()
