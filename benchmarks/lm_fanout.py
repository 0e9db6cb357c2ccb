"""Fan-out of LM stages: ``ForEach`` of N ``Predict`` stages with 50 ms of LM latency, with and
without the fast adapter, beside ``dspy.Parallel`` and a bare ``asyncio.gather(predict.acall)``.

Run: ``python benchmarks/lm_fanout.py [--n 128] [--reps 7]`` (prints a Markdown table; numbers go to
BENCHMARKS.md).

Wall time / ideal (ideal = the 50 ms latency: nothing caps concurrency here) and CPU µs per branch
(process CPU during the fan-out / N), medians of rotated repetitions. The fast adapter is
installed the way a user (or the engine) would: ``dspy.context(adapter=fast_adapter_for(...))``.
The LM is ``lm_cpu.py``'s canonical instant engine with a ``time.sleep`` / ``asyncio.sleep``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dspy

import stageflow
from _harness import dspy_untouched, machine_note, rotated_runs
from lm_cpu import astage_call, inline_thread_hops, make_lm, memoised_request_conversion
from stageflow.lm.fast import fast_adapter_for

LAT = 0.05


def variants(n: int) -> dict[str, Callable[[], Any]]:
    loop = asyncio.new_event_loop()
    lm = make_lm("[[ ## y ## ]]\nok\n\n[[ ## completed ## ]]", latency=LAT)
    predict = dspy.Predict("x -> y")
    fe = stageflow.ForEach(predict, over="xs", item="x", collect="ys")
    strs = [str(i) for i in range(n)]
    par = dspy.Parallel(num_threads=n, disable_progress_bar=True)
    out: dict[str, Callable[[], Any]] = {}

    async def sleeps() -> None:
        await asyncio.gather(*[asyncio.sleep(LAT) for _ in strs])

    out["ref asyncio.gather(asyncio.sleep)"] = lambda: loop.run_until_complete(sleeps())

    for label, adapter in (("", None), (", fast adapter", fast_adapter_for(None))):

        def ctx(fn: Callable[[], Any], adapter: Any = adapter, plain: bool = False) -> Callable[[], Any]:
            def run() -> Any:
                with dspy.context(lm=lm, adapter=adapter), dspy_untouched() if plain else nullcontext():
                    return fn()

            return run

        async def gather() -> None:
            await asyncio.gather(*[predict.acall(x=s) for s in strs])

        out[f"asyncio.gather(Predict.acall){label}"] = ctx(
            lambda: loop.run_until_complete(gather()), plain=True
        )
        out[f"dspy.Parallel(num_threads=N){label}"] = ctx(
            lambda: par([(predict, {"x": s}) for s in strs]), plain=True
        )
        out[f"stageflow ForEach(Predict), sync call{label}"] = ctx(lambda: fe(xs=strs))
        out[f"stageflow ForEach(Predict), acall{label}"] = ctx(
            lambda: loop.run_until_complete(fe.acall(xs=strs))
        )

    async def gather_stage_path() -> None:
        await asyncio.gather(*[astage_call(predict, {"x": s}, True) for s in strs])

    def proto() -> Any:
        with dspy.context(lm=lm, adapter=fast_adapter_for(None)):
            return loop.run_until_complete(gather_stage_path())

    out["prototype: gather(async stage path P2), fast adapter"] = proto

    def with_hops_inline(fn: Callable[[], Any]) -> Callable[[], Any]:
        def run() -> Any:
            with inline_thread_hops(), memoised_request_conversion():
                return fn()

        return run

    fast_ctx = {"lm": lm, "adapter": fast_adapter_for(None)}

    def foreach_fast() -> Any:
        with dspy.context(**fast_ctx):
            return loop.run_until_complete(fe.acall(xs=strs))

    out["prototype: ForEach acall, fast adapter + P3 + P4 (DSPy LM layer)"] = with_hops_inline(foreach_fast)
    out["prototype: gather(P2) + P3 + P4 (DSPy LM layer)"] = with_hops_inline(proto)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("dspy").setLevel(logging.ERROR)
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    vs = variants(args.n)
    wall, cpu = rotated_runs(vs, args.reps)
    title = f"N={args.n} Predict stages × {LAT * 1000:.0f} ms"
    print(f"# LM fan-out: {title} ({machine_note()}; reps={args.reps})\n")
    print("| variant | wall / ideal | CPU µs / branch |\n|---|---|---|")
    for k in vs:
        ratio, per_branch = wall[k] / LAT, cpu[k] / args.n * 1e6
        print(f"| {k} | {ratio:.2f}× | {per_branch:.0f} |")


if __name__ == "__main__":
    main()
