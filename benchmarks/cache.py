"""Stage cache vs DSPy: cost of a memory hit, a persistent hit and a miss, side by side.

Run: ``python benchmarks/cache.py`` (CPU µs per call, medians of 21 rotated repetitions). What a
SIGKILL can lose from the persistent store: ``python benchmarks/cache_durability.py``.

Every variant is a one-stage pipeline (or bare ``dspy.Predict``) on an instant fake LM, so the
numbers are framework CPU only.
"""

from __future__ import annotations

import itertools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dspy

import stageflow
from _harness import machine_note, measure
from stageflow.policies.cache import CachePolicy, MemoryStore
from stageflow.policies.stores import SQLiteStore
from stageflow.testing import FakeLM

RATES = {f"k{i}": i for i in range(20)}  # settings a stage reads from its module (changed in place: a miss)
# A log the stage appends to: its own data, marked so (a plain list it changes would make it uncached).
CALLS: list[str] = stageflow.untracked([]) if hasattr(stageflow, "untracked") else []


def reads_settings(question: str) -> dict[str, str]:
    CALLS.append(question)
    return {"answer": f"Paris {RATES['k3']}"}


def paired_miss_cost(lm: FakeLM, blocks: int = 30, calls: int = 200) -> float:
    """Median over blocks of (cached-miss pipeline − uncached pipeline), CPU µs per call; the two run
    back to back in each block, so machine drift cancels out."""
    import statistics
    import time

    fresh = itertools.count()
    plain = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    miss = stageflow.SequentialPipeline(
        [stageflow.CachedStage(dspy.Predict("question -> answer"), cache_size=64)]
    )
    diffs = []
    with dspy.context(lm=lm):
        for _ in range(blocks):
            t0 = time.process_time()
            for _ in range(calls):
                plain(question=f"q{next(fresh)}")
            t1 = time.process_time()
            for _ in range(calls):
                miss(question=f"q{next(fresh)}")
            t2 = time.process_time()
            diffs.append(((t2 - t1) - (t1 - t0)) / calls * 1e6)
    return statistics.median(diffs)


def main() -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    lm = FakeLM({"answer": "Paris"})
    cached_lm = FakeLM({"answer": "Paris"})
    cached_lm.cache = True  # DSPy's own LM response cache (memory)
    fresh = itertools.count()

    predict = dspy.Predict("question -> answer")
    plain = stageflow.SequentialPipeline([predict])
    noop = stageflow.SequentialPipeline(
        [stageflow.stage(lambda question: {"answer": "Paris"}, writes=["answer"])]
    )
    fn_miss = stageflow.SequentialPipeline(
        [stageflow.CachedStage(stageflow.stage(lambda question: {"answer": "Paris"}, writes=["answer"]), 64)]
    )
    hit_stage = stageflow.CachedStage(dspy.Predict("question -> answer"))
    hit = stageflow.SequentialPipeline([hit_stage])
    with_demos = dspy.Predict("question -> answer")
    with_demos.demos = [dspy.Example(question=f"q{i} " * 40, answer=f"a{i} " * 10) for i in range(8)]
    hit_demos = stageflow.SequentialPipeline([stageflow.CachedStage(with_demos)])
    structured = {"docs": [f"passage {i} " * 20 for i in range(10)], "k": 3, "weights": (0.5, 0.25)}
    hit_structured = stageflow.SequentialPipeline(
        [stageflow.CachedStage(stageflow.stage(lambda question, ctx: {"answer": "Paris"}, writes=["answer"]))]
    )
    hit_settings = stageflow.SequentialPipeline(
        [stageflow.CachedStage(stageflow.stage(reads_settings, writes=["answer"]))]
    )
    miss = stageflow.SequentialPipeline(
        [stageflow.CachedStage(dspy.Predict("question -> answer"), cache_size=64)]
    )
    tmp = Path(tempfile.mkdtemp())
    store = SQLiteStore(tmp / "cache.db")
    persistent = stageflow.SequentialPipeline(
        [stageflow.Stage(dspy.Predict("question -> answer"), cache=CachePolicy(MemoryStore(1), store))]
    )
    miss_persist = stageflow.SequentialPipeline(
        [
            stageflow.Stage(
                dspy.Predict("question -> answer"),
                cache=CachePolicy(MemoryStore(64), SQLiteStore(tmp / "miss.db")),
            )
        ]
    )
    with dspy.context(lm=lm):
        hit(question="q")
        hit_demos(question="q")
        hit_structured(question="q", ctx=structured)
        hit_settings(question="q")
        persistent(question="a")
        persistent(question="b")
        store.flush()
        toggle = itertools.cycle(["a", "b"])  # memory holds 1 entry: every call misses memory, hits SQLite
        variants = {
            "dspy.Predict, no cache": lambda: predict(question="q"),
            "dspy.Predict, DSPy LM-cache hit": lambda: predict(question="q", lm=cached_lm),
            "stageflow pipeline, uncached Predict": lambda: plain(question="q"),
            "stageflow pipeline, no-op function stage": lambda: noop(question="q"),
            "stageflow pipeline, stage-cache memory hit": lambda: hit(question="q"),
            "stageflow pipeline, stage-cache memory hit, Predict with 8 demos": lambda: hit_demos(
                question="q"
            ),
            "stageflow pipeline, stage-cache memory hit, function stage, dict/list/tuple input": lambda: (
                hit_structured(question="q", ctx=structured)
            ),
            "stageflow pipeline, stage-cache memory hit, function stage reading a 20-key module dict "
            "and logging its calls": lambda: hit_settings(question="q"),
            "stageflow pipeline, stage-cache miss (memory)": lambda: miss(question=f"q{next(fresh)}"),
            "stageflow pipeline, function stage, stage-cache miss (memory)": lambda: fn_miss(
                question=f"q{next(fresh)}"
            ),
            "stageflow pipeline, stage-cache miss (memory + SQLite)": lambda: miss_persist(
                question=f"q{next(fresh)}"
            ),
            "stageflow pipeline, stage-cache persistent hit (SQLite)": lambda: persistent(
                question=next(toggle)
            ),
            "CachedStage called alone, hit": lambda: hit_stage(question="q"),
        }
        res = measure(variants)
    if len(CALLS) > 1:  # (the row is about hits: a stage that ran on every call would measure misses)
        raise SystemExit(f"the settings-reading stage ran {len(CALLS)} times: its row would not be hits")
    cpu = {k: v["cpu_us"] for k, v in res.items()}
    wall = {k: v["wall_us"] for k, v in res.items()}
    print(f"# Stage cache ({machine_note()})\n")
    print("| variant | CPU µs per call | wall µs per call |")
    print("|---|---|---|")
    for k, v in cpu.items():
        print(f"| {k} | {v:.1f} | {wall[k]:.1f} |")
    base = cpu["stageflow pipeline, no-op function stage"]
    hit_cost = cpu["stageflow pipeline, stage-cache memory hit"] - base
    dspy_hit = cpu["dspy.Predict, DSPy LM-cache hit"]
    print()
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| stage-cache memory hit, over a no-op stage | {hit_cost:.1f} µs | ≤ 20 µs |")
    demos_cost = cpu["stageflow pipeline, stage-cache memory hit, Predict with 8 demos"] - base
    print(f"| stage-cache memory hit, Predict with 8 demos (checked on every call) | {demos_cost:.1f} µs | |")
    structured_cost = (
        cpu["stageflow pipeline, stage-cache memory hit, function stage, dict/list/tuple input"] - base
    )
    print(
        f"| stage-cache memory hit, function stage, 13-value structured input | {structured_cost:.1f} µs | |"
    )
    settings_cost = (
        cpu[
            "stageflow pipeline, stage-cache memory hit, function stage reading a 20-key module dict "
            "and logging its calls"
        ]
        - base
    )
    print(
        "| stage-cache memory hit, function stage whose key holds the data it reads (20-key dict) | "
        f"{settings_cost:.1f} µs | |"
    )
    print(
        f"| DSPy LM-cache hit / stage-cache hit (pipeline call incl.) | "
        f"{dspy_hit / cpu['stageflow pipeline, stage-cache memory hit']:.0f}× | ≥ 30× for the hit itself |"
    )
    print(
        "| DSPy LM-cache hit / stage-cache hit (hit cost alone) | "
        f"{dspy_hit / max(hit_cost, 0.1):.0f}× | ≥ 30× |"
    )
    added = cpu["stageflow pipeline, stage-cache miss (memory)"] - cpu["stageflow pipeline, uncached Predict"]
    print(f"| a memory miss adds (Predict stage, rotated runs: DSPy's noise dominates) | {added:.1f} µs | |")
    paired = paired_miss_cost(lm)
    print(
        f"| a memory miss adds (Predict stage, paired A/B, median of 30 blocks) | {paired:.1f} µs | ≤ 20 µs |"
    )
    fn_added = cpu["stageflow pipeline, function stage, stage-cache miss (memory)"] - base
    print(f"| a memory miss adds (function stage: key, lookup, store) | {fn_added:.1f} µs | ≤ 20 µs |")
    persist_added = (
        cpu["stageflow pipeline, stage-cache miss (memory + SQLite)"]
        - cpu["stageflow pipeline, stage-cache miss (memory)"]
    )
    wall_added = (
        wall["stageflow pipeline, stage-cache miss (memory + SQLite)"]
        - wall["stageflow pipeline, stage-cache miss (memory)"]
    )
    print(
        "| a persistent write adds to a miss: process CPU (incl. the background writer) / caller wall | "
        f"{persist_added:.1f} µs / {wall_added:.1f} µs | |"
    )
    print(
        f"| persistent (SQLite) hit, over a no-op stage | "
        f"{cpu['stageflow pipeline, stage-cache persistent hit (SQLite)'] - base:.1f} µs | |"
    )
    store.flush()


if __name__ == "__main__":
    main()
