"""Fan-out / fan-in: N branches × 50 ms of simulated LM latency, side by side in one run.

Run: ``python benchmarks/fanout.py`` (peers are measured when ``langgraph`` / ``langchain_core``
are importable: ``pip install -r benchmarks/requirements-peers.txt`` in a benchmark venv).

Reported per variant and N: wall / ideal (ideal = 50 ms × ceil(N / cap); no cap here) and CPU
µs per branch (process CPU during the fan-out / N). Medians of ``REPS`` rotated repetitions.

A second table (``--wide-only`` runs just that one) takes light branches (20 ms sleeps) to the widths
``WIDE`` = 512 and 2,048, where the framework's CPU per branch decides the wall time on 2 cores:
``ForEach.acall`` beside ``asyncio.gather``, the sync ``ForEach`` beside a long-lived thread pool of
the same size as stageflow's (``max_threads`` = 512 workers, so ideal = 20 ms × ceil(N / 512)).
"""

from __future__ import annotations

import asyncio
import operator
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypedDict

import dspy

import stageflow
from stageflow.engine.config import CONFIG
from stageflow.testing import FakeLM


class PeerState(TypedDict):
    xs: list[int]
    ys: Annotated[list[int], operator.add]


LAT = 0.05
REPS = 7
SIZES = (8, 32, 128)
WIDE = (512, 2048)
WIDE_LAT = 0.02
WIDE_REPS = 15


class _Loop:
    """One persistent event loop for async variants (no loop start-up in the timing)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)


LOOP = _Loop()
POOL = ThreadPoolExecutor(max_workers=256)


def variants(n: int) -> dict[str, Callable[[], Any]]:
    items = list(range(n))
    out: dict[str, Callable[[], Any]] = {}

    async def gather() -> None:
        await asyncio.gather(*[asyncio.sleep(LAT) for _ in items])

    out["ref asyncio.gather(asyncio.sleep)"] = lambda: LOOP.run(gather())

    def pool() -> None:
        list(POOL.map(lambda _: time.sleep(LAT), items))

    out["ref long-lived ThreadPoolExecutor (time.sleep)"] = pool

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
    out["stageflow ForEach, sync stage, sync call (threads)"] = lambda: fe_sync(xs=items)
    out["stageflow ForEach, async stage, sync call"] = lambda: fe_async(xs=items)
    out["stageflow ForEach, async stage, acall"] = lambda: LOOP.run(fe_async.acall(xs=items))

    lm = FakeLM({"y": "ok"}, latency=LAT)
    predict = dspy.Predict("x -> y")
    fe_predict = stageflow.ForEach(predict, over="xs", item="x", collect="ys")

    async def bare_predict() -> None:
        with dspy.context(lm=lm):
            await asyncio.gather(*[predict.acall(x=str(i)) for i in items])

    def with_lm(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with dspy.context(lm=lm):
                return fn()

        return run

    strs = [str(i) for i in items]
    out["ref asyncio.gather(Predict.acall)"] = lambda: LOOP.run(bare_predict())
    out["stageflow ForEach(Predict), sync call"] = with_lm(lambda: fe_predict(xs=strs))
    out["stageflow ForEach(Predict), acall"] = with_lm(lambda: LOOP.run(fe_predict.acall(xs=strs)))
    par = dspy.Parallel(num_threads=n, disable_progress_bar=True)
    out["dspy.Parallel(num_threads=N) over Predict"] = with_lm(
        lambda: par([(predict, {"x": s}) for s in strs])
    )
    out.update(peer_variants(n))
    return out


def peer_variants(n: int) -> dict[str, Callable[[], Any]]:
    out: dict[str, Callable[[], Any]] = {}
    try:
        from langgraph.graph import END, START, StateGraph
        from langgraph.types import Send
    except ImportError:
        return out

    async def anode(state: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(LAT)
        return {"ys": [state["x"]]}

    def snode(state: dict[str, Any]) -> dict[str, Any]:
        time.sleep(LAT)
        return {"ys": [state["x"]]}

    def build(node: Any) -> Any:
        g = StateGraph(PeerState)
        g.add_node("work", node)
        g.add_conditional_edges(START, lambda s: [Send("work", {"x": x}) for x in s["xs"]])
        g.add_edge("work", END)
        return g.compile()

    ga, gs = build(anode), build(snode)
    items = list(range(n))
    out["LangGraph Send, ainvoke"] = lambda: LOOP.run(ga.ainvoke({"xs": items, "ys": []}))
    out["LangGraph Send, invoke, max_concurrency=N"] = lambda: gs.invoke(
        {"xs": items, "ys": []}, config={"max_concurrency": n}
    )
    try:
        from langchain_core.runnables import RunnableLambda
    except ImportError:
        return out

    async def asleep(x: int) -> int:
        await asyncio.sleep(LAT)
        return x

    r = RunnableLambda(lambda x: x, afunc=asleep)
    out["LCEL abatch"] = lambda: LOOP.run(r.abatch(items))
    return out


def wide_variants(n: int) -> dict[str, tuple[Callable[[], Any], float]]:
    """Light branches at width ``n``: ``{name: (run, ideal seconds)}``."""
    items = list(range(n))
    threads = CONFIG.max_threads
    pool_ideal = WIDE_LAT * -(-n // threads)

    async def gather() -> None:
        await asyncio.gather(*[asyncio.sleep(WIDE_LAT) for _ in items])

    def pool() -> None:
        list(WIDE_POOL.map(lambda _: time.sleep(WIDE_LAT), items))

    def sync_stage(x: int) -> dict[str, int]:
        time.sleep(WIDE_LAT)
        return {"y": x}

    async def async_stage(x: int) -> dict[str, int]:
        await asyncio.sleep(WIDE_LAT)
        return {"y": x}

    fe_sync = stageflow.ForEach(stageflow.stage(sync_stage, writes=["y"]), over="xs", item="x", collect="ys")
    fe_async = stageflow.ForEach(
        stageflow.stage(async_stage, writes=["y"]), over="xs", item="x", collect="ys"
    )

    async def gather_fn() -> None:
        await asyncio.gather(*[async_stage(x) for x in items])

    def pool_fn() -> None:
        list(WIDE_POOL.map(sync_stage, items))

    return {
        "ref asyncio.gather(asyncio.sleep)": (lambda: LOOP.run(gather()), WIDE_LAT),
        "stageflow ForEach, async stage, acall": (lambda: LOOP.run(fe_async.acall(xs=items)), WIDE_LAT),
        f"ref long-lived ThreadPoolExecutor({threads}) (time.sleep)": (pool, pool_ideal),
        "stageflow ForEach, sync stage, sync call (threads)": (lambda: fe_sync(xs=items), pool_ideal),
        "ref asyncio.gather(the same stage function)": (lambda: LOOP.run(gather_fn()), WIDE_LAT),
        f"ref ThreadPoolExecutor({threads}).map(the same stage function)": (pool_fn, pool_ideal),
    }


WIDE_POOL = ThreadPoolExecutor(max_workers=512)


def wide() -> None:
    """The wide table: wall / ideal, CPU µs per branch, and the ratios the targets are about."""
    rows: dict[str, dict[int, tuple[float, float, float]]] = {}
    for n in WIDE:
        vs = wide_variants(n)
        for fn, _ in vs.values():
            fn()
        wall: dict[str, list[float]] = {k: [] for k in vs}
        cpu: dict[str, list[float]] = {k: [] for k in vs}
        names = list(vs)
        for r in range(WIDE_REPS):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                w0, c0 = time.perf_counter(), time.process_time()
                vs[name][0]()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        for k, (_, ideal) in vs.items():
            rows.setdefault(k, {})[n] = (
                statistics.median(wall[k]) / ideal,
                statistics.median(cpu[k]) / n * 1e6,
                statistics.mean(wall[k]) / ideal,  # the mean counts the runs a full collection hit
            )
    load = os.getloadavg()[0]
    print(f"\n# Wide fan-out: N light branches × {WIDE_LAT * 1000:.0f} ms (wall / ideal; CPU µs per branch)")
    print(f"# load average {load:.2f} at the end\n")
    print("| variant | " + " | ".join(f"N={n} | CPU µs/branch" for n in WIDE) + " |")
    print("|---|" + "---|---|" * len(WIDE))
    for k, by_n in rows.items():
        print(f"| {k} | " + " | ".join(f"{by_n[n][0]:.2f}× | {by_n[n][1]:.1f}" for n in WIDE) + " |")
    names = list(rows)
    pairs = [
        (names[1], names[0], "≤ 1.2"),
        (names[3], names[2], "≤ 1.1"),
        (names[1], names[4], "(same user code by hand)"),
        (names[3], names[5], "(same user code by hand)"),
    ]
    print()
    heads = " | ".join(f"N={n} median | N={n} mean" for n in WIDE)
    print(f"| ratio (stageflow / reference, wall) | {heads} | target |")
    print("|---|" + "---|---|" * len(WIDE) + "---|")
    for a, b, target in pairs:
        ra, rb = rows[a], rows[b]
        cells = " | ".join(f"{ra[n][0] / rb[n][0]:.3f} | {ra[n][2] / rb[n][2]:.3f}" for n in WIDE)
        print(f"| {a} / {b} | {cells} | {target} |")
    print()
    print(
        "| framework CPU µs per branch (stageflow − reference) | "
        + " | ".join(f"N={n}" for n in WIDE)
        + " | target |"
    )
    print("|---|" + "---|" * len(WIDE) + "---|")
    for (a, b, _), target in zip(pairs[:2], ("≤ 10", "–"), strict=True):
        cells = " | ".join(f"{rows[a][n][1] - rows[b][n][1]:.1f}" for n in WIDE)
        print(f"| {a} − {b} | {cells} | {target} |")
    sys.stdout.flush()


def main() -> None:
    if "--wide-only" in sys.argv:
        wide()
        return
    rows: dict[str, dict[int, tuple[float, float]]] = {}
    for n in SIZES:
        vs = variants(n)
        for fn in vs.values():  # warm up (imports, pools, loops)
            fn()
        wall: dict[str, list[float]] = {k: [] for k in vs}
        cpu: dict[str, list[float]] = {k: [] for k in vs}
        names = list(vs)
        for r in range(REPS):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                w0, c0 = time.perf_counter(), time.process_time()
                vs[name]()
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        for k in vs:
            rows.setdefault(k, {})[n] = (
                statistics.median(wall[k]) / LAT,
                statistics.median(cpu[k]) / n * 1e6,
            )
    print(f"# Fan-out: N branches × {LAT * 1000:.0f} ms (wall / ideal; CPU µs per branch)\n")
    print("| variant | " + " | ".join(f"N={n}" for n in SIZES) + f" | CPU µs/branch at N={SIZES[-1]} |")
    print("|---|" + "---|" * (len(SIZES) + 1))
    for k, by_n in rows.items():
        cells = " | ".join(f"{by_n[n][0]:.2f}×" for n in SIZES)
        print(f"| {k} | {cells} | {by_n[SIZES[-1]][1]:.0f} |")
    big = {k: v[SIZES[-1]][0] for k, v in rows.items()}
    print(f"\nRatios at N={SIZES[-1]}:")
    pairs = [
        (
            "stageflow ForEach, sync stage, sync call (threads)",
            "ref long-lived ThreadPoolExecutor (time.sleep)",
        ),
        ("stageflow ForEach, async stage, sync call", "ref asyncio.gather(asyncio.sleep)"),
        ("stageflow ForEach, async stage, acall", "ref asyncio.gather(asyncio.sleep)"),
        ("stageflow ForEach(Predict), acall", "ref asyncio.gather(Predict.acall)"),
        ("stageflow ForEach(Predict), sync call", "ref asyncio.gather(Predict.acall)"),
    ]
    for a, b in pairs:
        print(f"- {a} / {b}: {big[a] / big[b]:.3f}")
    sys.stdout.flush()
    wide()


if __name__ == "__main__":
    main()
