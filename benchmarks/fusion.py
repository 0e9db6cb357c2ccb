"""Stage fusion: LM calls and latency of a 4-stage fusable pipeline before and after ``fuse``.

Run: ``python benchmarks/fusion.py`` (fake LM with a fixed per-call latency) and
``python benchmarks/fusion.py --embedded`` (also on the embedded SmolLM2 model, if installed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import dspy

import stageflow
from stageflow.testing import FakeLM

LATENCY = 0.05


def build() -> stageflow.SequentialPipeline:
    return stageflow.SequentialPipeline(
        [
            dspy.Predict("text -> topic"),
            dspy.Predict("text, topic -> summary"),
            dspy.Predict("summary -> title"),
            dspy.Predict("summary, title -> tweet"),
        ]
    )


def run(
    lm: dspy.BaseLM, program: stageflow.SequentialPipeline, reps: int, text: str
) -> tuple[float, int, list[str]]:
    times = []
    calls_before = getattr(lm, "calls", None)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        for _ in range(reps):
            t0 = time.perf_counter()
            result = program(text=text)
            times.append(time.perf_counter() - t0)
    calls = (lm.calls - calls_before) // reps if calls_before is not None else len(lm.history) // reps
    return statistics.median(times), calls, sorted(result.keys())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--embedded", action="store_true", help="also measure on the embedded local model")
    args = parser.parse_args()
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)  # every call reaches the LM
    text = "The Danube flows through ten countries before reaching the Black Sea."
    original = build()
    fused = stageflow.fuse(original)
    print("# Stage fusion: 4 chained predictors\n")
    print(f"fused signature: `{fused.stages[0].signature.signature}`\n")
    print("| LM | variant | LM calls | median latency | result fields |")
    print("|---|---|---|---|---|")
    lm = FakeLM({"topic": "rivers", "summary": "s", "title": "t", "tweet": "w"}, latency=LATENCY)
    rows = []
    for name, program in (("original (4 stages)", original), ("fused (stageflow.fuse)", fused)):
        latency, calls, fields = run(lm, program, 5, text)
        rows.append((f"fake LM, {LATENCY * 1000:.0f} ms/call", name, calls, latency, fields))
    if args.embedded:
        from stageflow.lm import resolve_lm

        local = resolve_lm("local")
        for name, program in (("original (4 stages)", original), ("fused (stageflow.fuse)", fused)):
            local.history.clear()
            latency, calls, fields = run(local, program, 3, text)
            rows.append(("embedded SmolLM2-135M", name, calls, latency, fields))
    for lm_name, name, calls, latency, fields in rows:
        print(f"| {lm_name} | {name} | {calls} | {latency * 1000:.0f} ms | {', '.join(fields)} |")


if __name__ == "__main__":
    main()
