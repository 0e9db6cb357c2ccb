"""What LM budgets and rate limits cost per LM call, side by side in one run.

Run: ``python benchmarks/budgets.py [--scale 1]`` (prints Markdown tables; numbers go to BENCHMARKS.md).

The LM is a canonical DSPy 3.4 engine that answers instantly (DSPy's whole adapter and LM path runs;
only the network is gone), so what the variants add shows against the CPU of the call itself.
Workloads: a 10-stage ``SequentialPipeline`` of ``Predict`` stages (sync and ``acall``) and a bare
``dspy.Predict`` call outside any pipeline. Variants:

* ``DSPy untouched``: stageflow's wrapper around DSPy's LM execution not installed (as before any
  budget or rate limit is used in the process);
* ``wrapper idle``: installed, but no budget open and no rate limit set (the zero-cost rule);
* ``budget block``: every call inside ``with stageflow.budget(max_calls=..., max_tokens=...)``;
* ``run budget``: ``pipeline.set_budget(...)`` (a ledger per pipeline call, plus the above);
* ``rate limit``: ``stageflow.rate_limit(model, rpm=10**9, tpm=10**12)``, which never blocks;
* ``budget + rate limit``: both.

Workloads: the LM layer alone (``dspy.clients.execution.execute`` on a prepared call: what the
wrapper adds, with the least else around it), a bare ``dspy.Predict``, and a 10-stage pipeline of
``Predict`` stages (sync and ``acall``; the async LM path hops to worker threads twice per call,
so its numbers scatter most).

Per LM call overhead (µs) = (variant − ``DSPy untouched``) process CPU per operation / LM calls per
operation: the median of paired differences, operation by operation, over rounds in which every
variant runs once (rotated), so the machine's load falls on all variants alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dspy
from dspy.lm15 import Message, Response, Usage

import stageflow
from _harness import machine_note
from stageflow.budgets import intercept

STAGES = 10


class InstantEngine:
    def __init__(self) -> None:
        self.response = Response(
            id=None,
            model="fake/instant",
            message=Message.assistant("[[ ## answer ## ]]\nok\n\n[[ ## completed ## ]]"),
            finish_reason="stop",
            usage=Usage(input_tokens=40, output_tokens=5, total_tokens=45),
        )

    def complete(self, request: Any) -> Response:
        return self.response

    def close(self) -> None:
        return None


class AsyncInstantEngine(InstantEngine):
    async def complete(self, request: Any) -> Response:  # type: ignore[override]
        return self.response

    async def aclose(self) -> None:
        return None


LM = dspy.LM(
    "fake/instant",
    engine=InstantEngine(),
    async_engine=AsyncInstantEngine(),
    cache=False,
    num_retries=0,
    max_tokens=64,
)
PIPE = stageflow.SequentialPipeline([dspy.Predict("question -> answer") for _ in range(STAGES)])
RUN_BUDGETED = stageflow.SequentialPipeline(list(PIPE.stages)).set_budget(max_calls=10**12, max_tokens=10**15)
PREDICT = dspy.Predict("question -> answer")
LOOP = asyncio.new_event_loop()


@contextlib.contextmanager
def setting(name: str) -> Iterator[None]:
    """The process state a variant needs, for the duration of one timed batch."""
    if name == "DSPy untouched":
        intercept.uninstall()
        yield
        return
    intercept.install()
    with contextlib.ExitStack() as stack:
        if "budget block" in name or name == "budget + rate limit":
            stack.enter_context(stageflow.budget(max_calls=10**12, max_tokens=10**15))
        if "rate limit" in name:
            stack.enter_context(stageflow.rate_limit("fake/instant", rpm=10**9, tpm=10**12))
        yield


VARIANTS = [
    "DSPy untouched",
    "wrapper idle",
    "budget block",
    "run budget",
    "rate limit",
    "budget + rate limit",
]


def workloads() -> dict[str, tuple[int, Callable[[str], Callable[[], Any]]]]:
    """name -> (LM calls per operation, variant -> operation)."""

    def pipe_sync(variant: str) -> Callable[[], Any]:
        target = RUN_BUDGETED if variant == "run budget" else PIPE
        return lambda: target(question="q")

    def pipe_async(variant: str) -> Callable[[], Any]:
        target = RUN_BUDGETED if variant == "run budget" else PIPE
        return lambda: LOOP.run_until_complete(target.acall(question="q"))

    def bare(variant: str) -> Callable[[], Any]:
        return lambda: PREDICT(question="q")

    def layer(variant: str) -> Callable[[], Any]:
        from dspy.clients import execution

        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "q"}]
        call = execution.prepare(LM, None, messages, {})
        return lambda: execution.execute(LM, call)  # looked up per call: wrapped or not

    return {
        "LM layer (execute)": (1, layer),
        "bare dspy.Predict": (1, bare),
        "10-stage pipeline": (STAGES, pipe_sync),
        "10-stage pipeline, acall": (STAGES, pipe_async),
    }


def forget_history() -> None:
    """Empty DSPy's history lists, so every batch appends to short lists (their trimming costs more
    as they fill, which would favour whichever variant ran first)."""
    from dspy.clients.base_lm import GLOBAL_HISTORY

    GLOBAL_HISTORY.clear()
    LM.history.clear()
    for module in (PREDICT, *PIPE.stages):
        module.history.clear()


def run(scale: float) -> dict[str, dict[str, float]]:
    """Each round runs one operation of every variant, in rotated order, timing only the operation
    (entering the variant's budget or limit is outside the timed region); the result per variant is
    the median over rounds, and its overhead the median of its paired differences to
    ``DSPy untouched`` in the same rounds (adjacent operations see the same machine load)."""
    out: dict[str, dict[str, float]] = {}
    rounds_of = {"LM layer (execute)": 3000, "bare dspy.Predict": 1000, "10-stage pipeline": 300}
    with dspy.context(lm=LM):
        for workload, (calls, make) in workloads().items():
            variants = [v for v in VARIANTS if not (calls != STAGES and v == "run budget")]
            ops = {v: make(v) for v in variants}
            rounds = max(20, int(rounds_of.get(workload, 200) * scale))
            cpu: dict[str, list[float]] = {v: [] for v in variants}
            for v in variants:  # warm every path once
                with setting(v):
                    ops[v]()
            gc.disable()
            try:
                for r in range(rounds):
                    if r % 50 == 0:
                        forget_history()
                        gc.collect()
                    for v in variants[r % len(variants) :] + variants[: r % len(variants)]:
                        with setting(v):
                            c0 = time.process_time_ns()
                            ops[v]()
                            cpu[v].append((time.process_time_ns() - c0) / calls / 1000)
            finally:
                gc.enable()
            base = cpu["DSPy untouched"]
            out[workload] = {v: statistics.median(cpu[v]) for v in variants}
            for v in variants:
                out[workload][v + " Δ"] = statistics.median(a - b for a, b in zip(cpu[v], base, strict=True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="more (or fewer) rounds per workload")
    args = parser.parse_args()
    note = machine_note()
    results = run(args.scale)
    print(f"# LM budgets and rate limits: CPU µs per LM call ({note}; scale={args.scale})\n")
    names = list(results)
    print("| variant | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for v in VARIANTS:
        cells = []
        for w in names:
            row = results[w]
            if v not in row:
                cells.append("–")
            elif v == "DSPy untouched":
                cells.append(f"{row[v]:.1f}")
            else:
                cells.append(f"{row[v]:.1f} ({row[v + ' Δ']:+.1f})")
        print(f"| {v} | " + " | ".join(cells) + " |")
    print("\n(in brackets: CPU µs added per LM call against `DSPy untouched`, median of paired repetitions)")


if __name__ == "__main__":
    main()
