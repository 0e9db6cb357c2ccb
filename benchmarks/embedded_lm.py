"""The embedded model: load time, prompt and generation speed, and the demo's time outside the model.

Run: ``python benchmarks/embedded_lm.py [--questions 5]`` (prints Markdown tables; about 2 minutes).

1. Load: ``LlamaCppEngine.load()`` in fresh interpreters (median of 5), i.e. mmap + context setup.
2. Speed: llama.cpp directly (no grammar, temperature 0, the engine's thread count): prompt
   processing of a ~400-token prompt from a cleared KV cache, then 128 generated tokens.
3. Demo overhead: the demo's program (compact prompts, train demos, LM cache off) on dev questions. Every
   ``LlamaCppEngine.complete()`` call and every ``llama.create_chat_completion()`` call inside it is
   timed; the union of those intervals is time "in the model", the rest of the program's wall
   time is stageflow + DSPy + retrieval. ``complete()`` minus ``create_chat_completion()`` is the
   engine's own request translation (messages, JSON schema → grammar).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

LOAD_CODE = (
    "import time; t=time.perf_counter(); from stageflow.lm.engine import LlamaCppEngine; "
    "e=LlamaCppEngine(); s=e.load(); print(s, time.perf_counter()-t)"
)


def bench_load(reps: int = 5) -> tuple[float, float]:
    loads, totals = [], []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", LOAD_CODE], capture_output=True, text=True, check=True)
        load_s, total_s = map(float, out.stdout.split())
        loads.append(load_s)
        totals.append(total_s)
    return statistics.median(loads), statistics.median(totals)


def bench_speed(llama: Any, reps: int = 3, gen_tokens: int = 128) -> dict[str, float]:
    from stageflow.apps.multihop import corpus_path

    text = " ".join(corpus_path().read_text(encoding="utf-8").splitlines()[:12])
    tokens = llama.tokenize(text.encode(), add_bos=True)[:400]
    pp, tg = [], []
    for _ in range(reps):
        llama.reset()
        started = time.perf_counter()
        first_at = None
        for count, _tok in enumerate(llama.generate(tokens, temp=0.0, reset=True), start=1):
            if first_at is None:
                first_at = time.perf_counter()
            if count > gen_tokens:
                break
        done = time.perf_counter()
        assert first_at is not None
        pp.append(len(tokens) / (first_at - started))
        tg.append(gen_tokens / (done - first_at))
    return {
        "prompt_tokens": len(tokens),
        "pp_median": statistics.median(pp),
        "pp_best": max(pp),
        "tg_median": statistics.median(tg),
        "tg_best": max(tg),
    }


class Intervals:
    """Thread-safe recorder of (start, end) intervals."""

    def __init__(self) -> None:
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self._lock:
                    self.spans.append((started, time.perf_counter()))

        return timed

    def union(self, lo: float, hi: float) -> float:
        total, end = 0.0, lo
        for a, b in sorted(self.spans):
            a, b = max(a, end), min(b, hi)
            if b > a:
                total += b - a
                end = b
        return total


def bench_overhead(lm: Any, questions: int) -> dict[str, float]:
    import dspy

    from stageflow.apps.multihop import build_program, load_devset
    from stageflow.apps.multihop.demo import DEFAULT_DEMOS
    from stageflow.apps.multihop.evaluate import with_train_demos

    engine = lm.engine
    model = engine._model()
    complete_spans, llama_spans = Intervals(), Intervals()
    original_complete = engine.complete
    original_chat = model.llama.create_chat_completion
    engine.complete = complete_spans.wrap(original_complete)
    model.llama.create_chat_completion = llama_spans.wrap(original_chat)
    program = with_train_demos(build_program(compact=True), DEFAULT_DEMOS)  # what `stageflow demo` runs
    try:
        with dspy.context(lm=lm, adapter=program.adapter()):
            program(question="warm-up: who wrote Hamlet?")  # first-call costs (BM25 tokenizer, grammar cache)
            complete_spans.spans.clear()
            llama_spans.spans.clear()
            started = time.perf_counter()
            for ex in load_devset()[:questions]:
                program(question=ex.question)
            ended = time.perf_counter()
    finally:
        engine.complete = original_complete
        model.llama.create_chat_completion = original_chat
    wall = ended - started
    in_complete = complete_spans.union(started, ended)
    in_llama = llama_spans.union(started, ended)
    return {
        "questions": questions,
        "calls": len(llama_spans.spans),
        "wall": wall,
        "in_complete": in_complete,
        "in_llama": in_llama,
        "outside_complete_share": 1 - in_complete / wall,
        "outside_llama_share": 1 - in_llama / wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=5, help="dev questions for the overhead run")
    args = parser.parse_args(argv)

    from stageflow.lm import make_local_lm

    load_median, cold_median = bench_load()
    lm = make_local_lm(cache=False)
    engine = lm.engine
    engine.load()
    speed = bench_speed(engine._model().llama)
    overhead = bench_overhead(lm, args.questions)

    print(f"# Embedded model: {engine.model_path.name}, n_threads={engine.n_threads}, n_ctx={engine.n_ctx}\n")
    print("| measure | value |")
    print("|---|---|")
    print(f"| load (engine.load(), fresh process, median of 5) | {load_median:.2f} s |")
    print(f"| import + locate + load (fresh process, median of 5) | {cold_median:.2f} s |")
    print(
        f"| prompt processing ({speed['prompt_tokens']:.0f}-token prompt) | {speed['pp_median']:.0f} tok/s "
        f"(best {speed['pp_best']:.0f}) |"
    )
    print(f"| generation (128 tokens) | {speed['tg_median']:.1f} tok/s (best {speed['tg_best']:.1f}) |")
    print(
        f"\n# Demo time outside the model ({overhead['questions']:.0f} dev questions, as `stageflow demo`)\n"
    )
    print("| measure | value |")
    print("|---|---|")
    print(f"| program wall time | {overhead['wall']:.2f} s ({overhead['calls']:.0f} model calls) |")
    print(f"| in llama.cpp (create_chat_completion) | {overhead['in_llama']:.2f} s |")
    print(f"| in the engine (complete(), incl. grammar) | {overhead['in_complete']:.2f} s |")
    print(f"| outside llama.cpp | {overhead['outside_llama_share']:.2%} |")
    print(f"| outside the engine | {overhead['outside_complete_share']:.2%} (target < 2%) |")


if __name__ == "__main__":
    main()
