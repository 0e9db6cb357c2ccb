"""LM fan-out with DSPy's default LM cache on: ``ForEach`` of N ``Predict`` stages, 50 ms of LM
latency, every input new (cache misses that are written to DSPy's disk and memory cache), beside
``dspy.Parallel`` and a bare ``asyncio.gather(predict.acall)``.

``lm_fanout.py`` switches DSPy's cache off to measure the call path alone; users mostly keep it on,
and then each call also looks the request up and stores the answer (DSPy's async path does both on
worker threads). Run: ``python benchmarks/lm_fanout_cached.py [--n 128] [--reps 7]``.

Wall time / ideal (ideal = the 50 ms latency) and CPU µs per branch, medians of rotated repetitions.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dspy

import stageflow
from _harness import dspy_untouched, machine_note, rotated_runs
from lm_cpu import AsyncInstantEngine, InstantEngine

LAT = 0.05
TEXT = "[[ ## y ## ]]\nok\n\n[[ ## completed ## ]]"


def variants(n: int) -> dict[str, Callable[[], Any]]:
    loop = asyncio.new_event_loop()
    lm = dspy.LM(
        "fake/lm",
        engine=InstantEngine(TEXT, LAT),
        async_engine=AsyncInstantEngine(TEXT, LAT),
        cache=True,
        num_retries=0,
    )
    predict = dspy.Predict("x -> y")
    fe = stageflow.ForEach(predict, over="xs", item="x", collect="ys")
    par = dspy.Parallel(num_threads=n, disable_progress_bar=True)
    fresh = itertools.count()

    def inputs() -> list[str]:
        return [f"{next(fresh)}" for _ in range(n)]

    def plain(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with dspy.context(lm=lm), dspy_untouched():
                return fn()

        return run

    def staged(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with dspy.context(lm=lm):
                return fn()

        return run

    async def gather() -> None:
        await asyncio.gather(*[predict.acall(x=s) for s in inputs()])

    return {
        "asyncio.gather(Predict.acall)": plain(lambda: loop.run_until_complete(gather())),
        "dspy.Parallel(num_threads=N)": plain(lambda: par([(predict, {"x": s}) for s in inputs()])),
        "stageflow ForEach(Predict), sync call": staged(lambda: fe(xs=inputs())),
        "stageflow ForEach(Predict), acall": staged(lambda: loop.run_until_complete(fe.acall(xs=inputs()))),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("dspy").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as folder:
        dspy.configure_cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=folder)
        vs = variants(args.n)
        wall, cpu = rotated_runs(vs, args.reps)
    title = f"N={args.n} Predict stages × {LAT * 1000:.0f} ms, DSPy's disk + memory LM cache on (misses)"
    print(f"# LM fan-out, cache on: {title} ({machine_note()}; reps={args.reps})\n")
    print("| variant | wall / ideal | CPU µs / branch |\n|---|---|---|")
    for k in vs:
        ratio, per_branch = wall[k] / LAT, cpu[k] / args.n * 1e6
        print(f"| {k} | {ratio:.2f}× | {per_branch:.0f} |")


if __name__ == "__main__":
    main()
