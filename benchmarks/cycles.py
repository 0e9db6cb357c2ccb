"""What a fan-out call leaves to Python's cyclic garbage collector, beside the hand-written references.

An object freed by reference counting costs nothing more once the call returns. An object left in a
reference cycle waits for the collector: it stays in memory (with everything it refers to — a
branch's state, an LM's output) until a collection finds it, and a process that makes such garbage
on every call runs full (generation 2) collections more often, each walking every object of the
process — DSPy's, pydantic's and LiteLLM's included.

For each variant (N branches of an instant function stage; the error-path rows make every other
branch raise, and keep the errors), one fresh measurement per row:

- objects in cycles per call: the collector off, one call, 2.5 s for threads to let go of the
  last work they ran (before and after it), then ``gc.collect()``'s count;
- full collections per 300 calls and the collector's time per call (``gc.callbacks``), over 300
  calls with the collector on.

Run: ``PYTHONPATH=src python benchmarks/cycles.py [--n 512]`` (``PYTHONPATH=<tree>/src`` to compare
trees); prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import stageflow
from _harness import machine_note

CALLS = 300
#: Seconds for threads to let go of the last work they ran (an idle spare thread exits after 2 s).
SETTLE = 2.5


def variants(n: int) -> dict[str, Callable[[], Any]]:
    loop = asyncio.new_event_loop()
    pool = ThreadPoolExecutor(max_workers=n)
    items = list(range(n))

    def double(x: int) -> dict[str, int]:
        return {"y": 2 * x}

    async def adouble(x: int) -> dict[str, int]:
        return {"y": 2 * x}

    def each(fn: Any, **options: Any) -> Any:
        return stageflow.ForEach(
            stageflow.stage(fn, writes=["y"]), over="xs", item="x", collect="ys", **options
        )

    fail_fast, collect, timed, on_loop = (
        each(double),
        each(double, on_error="collect"),
        each(double, timeout=60),
        each(adouble),
    )

    async def gather() -> list[dict[str, int]]:
        return await asyncio.gather(*[adouble(x) for x in items])

    # The error path: every other item raises, and the fan-out goes on past it (its result keeps
    # the errors). The references keep the same errors (caught in the function, or by gather).
    def odd_fails(x: int) -> dict[str, int]:
        if x % 2:
            raise ValueError(f"item {x}")
        return {"y": 2 * x}

    async def aodd_fails(x: int) -> dict[str, int]:
        return odd_fails(x)

    def caught(x: int) -> Any:
        try:
            return odd_fails(x)
        except ValueError as e:
            return e

    collect_errors, skip_errors, acollect_errors = (
        each(odd_fails, on_error="collect"),
        each(odd_fails, on_error="skip"),
        each(aodd_fails, on_error="collect"),
    )

    async def gather_errors() -> list[Any]:
        return await asyncio.gather(*[aodd_fails(x) for x in items], return_exceptions=True)

    return {
        "ref ThreadPoolExecutor(N).map": lambda: list(pool.map(double, items)),
        "stageflow ForEach, sync stage (fail_fast, the default)": lambda: fail_fast(xs=items),
        "stageflow ForEach, sync stage, on_error='collect'": lambda: collect(xs=items),
        "stageflow ForEach, sync stage, timeout=": lambda: timed(xs=items),
        "ref asyncio.gather": lambda: loop.run_until_complete(gather()),
        "stageflow ForEach.acall, async stage": lambda: loop.run_until_complete(on_loop.acall(xs=items)),
        "ref ThreadPoolExecutor(N).map, every other item raises (errors kept)": lambda: list(
            pool.map(caught, items)
        ),
        "stageflow ForEach, sync stage, every other item raises, on_error='collect'": lambda: collect_errors(
            xs=items
        ),
        "stageflow ForEach, sync stage, every other item raises, on_error='skip'": lambda: skip_errors(
            xs=items
        ),
        "ref asyncio.gather(return_exceptions=True), every other item raises": lambda: (
            loop.run_until_complete(gather_errors())
        ),
        "stageflow ForEach.acall, async stage, every other item raises, on_error='collect'": lambda: (
            loop.run_until_complete(acollect_errors.acall(xs=items))
        ),
    }


def in_cycles(run: Callable[[], Any]) -> int:
    """Objects one call of ``run`` leaves in reference cycles."""
    time.sleep(SETTLE)  # (threads of earlier calls let go of their last work: it is not this call's)
    gc.collect()
    gc.disable()
    try:
        result = run()
        del result
        time.sleep(SETTLE)  # (this call's threads let go of their last work before it is looked at)
        return gc.collect()
    finally:
        gc.enable()


def collector_cost(run: Callable[[], Any]) -> tuple[int, float]:
    """Over ``CALLS`` calls: full collections, and the collector's seconds per call."""
    full, spent, started = [0], [0.0], [0.0]

    def watch(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            spent[0] += time.perf_counter() - started[0]
            full[0] += info["generation"] == 2

    gc.collect()
    gc.callbacks.append(watch)
    try:
        for _ in range(CALLS):
            run()
    finally:
        gc.callbacks.remove(watch)
    return full[0], spent[0] / CALLS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=512)
    args = parser.parse_args()
    vs = variants(args.n)
    for run in vs.values():  # (first calls build plans and caches that live on)
        for _ in range(3):
            run()
    print(f"# Reference cycles per call: N={args.n} branches of an instant stage ({machine_note()})\n")
    print("| variant | objects in cycles per call | full collections per 300 calls | collector ms per call |")
    print("|---|---|---|---|")
    for name, run in vs.items():
        left = in_cycles(run)
        full, per_call = collector_cost(run)
        print(f"| {name} | {left:,} | {full} | {per_call * 1e3:.2f} |")


if __name__ == "__main__":
    main()
