"""The embedded model: load time, prompt and generation speed, the prefix cache, the demo's time
outside the model and ``stageflow demo`` from command to answer.

Run: ``python benchmarks/embedded_lm.py [--questions 5] [--reps 5]`` (prints Markdown tables; about
5 minutes). Every section prints the load average it ran under: the machine is shared.

1. Load: ``LlamaCppEngine.load()`` in fresh interpreters (median of 5), i.e. mmap + context setup.
2. Speed: llama.cpp directly (no grammar, temperature 0, the engine's thread count): prompt
   processing of a ~400-token prompt from a cleared KV cache, then 128 generated tokens.
3. Prefix cache: the ``decompose`` architecture's two predictors with demos (decompose, synthesize;
   compact prompts, 4 train demos each) called alternately on dev questions, ``max_tokens=1`` so the
   time is prompt processing; ms per prompt token with ``prefix_slots=0`` (llama.cpp alone: reuse of
   the previous call's prefix) and with the default slots, in rotated order, median of ``--reps``.
   Then the whole ``decompose`` program, seconds per question, both ways.
4. Demo overhead: the demo's default program (LM cache off) on dev questions. Every
   ``LlamaCppEngine.complete()`` call and every ``llama.create_chat_completion()`` call inside it is
   timed; the union of those intervals is time "in the model", the rest of the program's wall
   time is stageflow + DSPy + retrieval. ``complete()`` minus ``create_chat_completion()`` is the
   engine's own request translation (messages, JSON schema → grammar) and the prefix cache.
5. ``python -m stageflow demo --no-cache`` in fresh processes: wall time from command to printed
   answer (median of ``--reps``).
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

    from stageflow.apps.multihop import load_devset
    from stageflow.apps.multihop.architectures import DEFAULT_ARCHITECTURE, build_architecture

    engine = lm.engine
    model = engine._model()
    complete_spans, llama_spans = Intervals(), Intervals()
    original_complete = engine.complete
    original_chat = model.llama.create_chat_completion
    engine.complete = complete_spans.wrap(original_complete)
    model.llama.create_chat_completion = llama_spans.wrap(original_chat)
    program = build_architecture(DEFAULT_ARCHITECTURE)  # what `stageflow demo` runs
    try:
        with dspy.context(lm=lm, adapter=program.adapter()):
            program(question="Who wrote Hamlet?")  # first-call costs (BM25 tokenizer, grammar cache)
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


def _alternating_requests(questions: int) -> list[Any]:
    """Requests of the decompose architecture's two predictors with demos, alternating per question."""
    from dspy.lm15 import Config, Message, Request

    from stageflow.apps.multihop import corpus_path, load_devset
    from stageflow.apps.multihop.architectures import build_architecture
    from stageflow.retrieval import read_corpus

    program = build_architecture("decompose")
    adapter = program.adapter()
    texts = {d["id"]: d["text"] for d in read_corpus(corpus_path())}
    requests = []
    for ex in load_devset()[:questions]:
        facts = [texts[i] for i in ex.supporting_ids]
        for predictor, inputs in (
            (program.decompose, {"question": ex.question}),
            (program.synthesize, {"question": ex.question, "facts": facts}),
        ):
            messages = adapter.format(predictor.signature, predictor.demos, inputs)
            turns = [
                Message.assistant(m["content"]) if m["role"] == "assistant" else Message.user(m["content"])
                for m in messages[1:]
            ]
            requests.append(
                Request(
                    model="local/bench",
                    system=messages[0]["content"],
                    messages=tuple(turns),
                    config=Config(max_tokens=1),
                )
            )
    return requests


def bench_prefix_cache(engine: Any, questions: int, reps: int) -> dict[str, Any]:
    """ms per prompt token for alternating predictors, prefix cache off vs on (rotated, medians)."""
    import os

    from stageflow.lm.engine import LlamaCppEngine

    requests = _alternating_requests(questions)
    variants = {
        "off (prefix_slots=0)": LlamaCppEngine(engine.model_path, n_threads=engine.n_threads, prefix_slots=0),
        f"on (prefix_slots={engine.prefix_slots})": engine,
    }
    model = engine._model()
    per_token: dict[str, list[float]] = {name: [] for name in variants}
    loads: list[float] = []
    tokens = 0
    for rep in range(reps):
        names = list(variants)
        for name in names[rep % 2 :] + names[: rep % 2]:
            model.prefix.clear()
            model.llama.reset()
            loads.append(os.getloadavg()[0])
            wall, tokens = 0.0, 0
            for request in requests:
                started = time.perf_counter()
                response = variants[name].complete(request)
                wall += time.perf_counter() - started
                tokens += response.usage.input_tokens or 0
            per_token[name].append(wall / tokens * 1000)
    return {
        "calls": len(requests),
        "tokens_per_call": tokens / len(requests),
        "ms_per_token": {name: statistics.median(v) for name, v in per_token.items()},
        "ranges": {name: (min(v), max(v)) for name, v in per_token.items()},
        "load": statistics.median(loads),
    }


def bench_prefix_strategies(engine: Any, questions: int, reps: int) -> dict[str, Any]:
    """The ways to keep one prefix per predictor, on the same alternating calls (``--strategies``).

    ``sequence snapshots`` is what the engine does; ``save_state/load_state`` swaps whole contexts
    with llama-cpp-python's API; ``one Llama per predictor`` routes each prefix to its own context
    (their load time is reported apart). Every strategy calls ``create_chat_completion`` with the
    engine's own message translation, ``max_tokens=1``.
    """
    import os

    from llama_cpp import Llama

    from stageflow.lm._messages import chat_messages
    from stageflow.lm.prefix import prefix_key

    calls = [chat_messages(r) for r in _alternating_requests(questions)]
    model = engine._model()
    base = model.llama

    def run_snapshots(messages: list[dict[str, str]]) -> Any:
        model.prefix.activate(base, prefix_key(messages), 8)
        return base.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)

    states: dict[str, Any] = {}
    current: list[str | None] = [None]

    def run_states(messages: list[dict[str, str]]) -> Any:
        key = prefix_key(messages) or ""
        if key != current[0]:
            if current[0] is not None:
                states[current[0]] = base.save_state()
            if key in states:
                base.load_state(states[key])
            current[0] = key
        return base.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)

    def rss_mb() -> float:
        with open("/proc/self/status", encoding="ascii") as fh:
            line = next(x for x in fh if x.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    rss_before = rss_mb()
    started = time.perf_counter()
    contexts = {
        key: Llama(
            model_path=str(engine.model_path),
            n_ctx=engine.n_ctx,
            n_threads=engine.n_threads,
            n_threads_batch=engine.n_threads,
            verbose=False,
        )
        for key in dict.fromkeys(prefix_key(m) for m in calls)
    }
    load_seconds = time.perf_counter() - started
    rss_added = rss_mb() - rss_before

    def run_contexts(messages: list[dict[str, str]]) -> Any:
        return contexts[prefix_key(messages)].create_chat_completion(
            messages=messages, max_tokens=1, temperature=0.0
        )

    def run_plain(messages: list[dict[str, str]]) -> Any:
        return base.create_chat_completion(messages=messages, max_tokens=1, temperature=0.0)

    strategies = {
        "llama.cpp alone (previous call's prefix)": run_plain,
        "sequence snapshots (the engine)": run_snapshots,
        "save_state/load_state": run_states,
        "one Llama per predictor": run_contexts,
    }
    per_token: dict[str, list[float]] = {name: [] for name in strategies}
    loads: list[float] = []
    for rep in range(reps):
        names = list(strategies)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            model.prefix.clear()
            states.clear()
            current[0] = None
            for llama in (base, *contexts.values()):
                llama.reset()
            loads.append(os.getloadavg()[0])
            wall, tokens = 0.0, 0
            for messages in calls:
                t0 = time.perf_counter()
                out = strategies[name](messages)
                wall += time.perf_counter() - t0
                tokens += out["usage"]["prompt_tokens"]
            per_token[name].append(wall / tokens * 1000)
    for llama in contexts.values():
        llama.close()
    return {
        "ms_per_token": {name: statistics.median(v) for name, v in per_token.items()},
        "load": statistics.median(loads),
        "extra_load_seconds": load_seconds,
        "contexts": len(contexts),
        "rss_added_mb": rss_added,
    }


def bench_decompose_program(lm: Any, questions: int) -> dict[str, float]:
    """Seconds per question of the whole decompose program, prefix cache off then on (one pass each)."""
    import os

    import dspy

    from stageflow.apps.multihop import load_devset
    from stageflow.apps.multihop.architectures import build_architecture

    out: dict[str, float] = {}
    engine = lm.engine
    model = engine._model()
    slots = engine.prefix_slots
    try:
        for value in (0, slots):
            engine.prefix_slots = value
            model.prefix.clear()
            program = build_architecture("decompose")
            load = os.getloadavg()[0]
            started = time.perf_counter()
            with dspy.context(lm=lm, adapter=program.adapter()):
                for ex in load_devset()[:questions]:
                    program(question=ex.question)
            out[f"slots={value}"] = (time.perf_counter() - started) / questions
            out[f"load slots={value}"] = load
    finally:
        engine.prefix_slots = slots
    return out


def bench_demo_command(reps: int) -> dict[str, float]:
    """``python -m stageflow demo --no-cache``: wall seconds from command to exit, in fresh processes."""
    import os

    walls, loads = [], []
    for _ in range(reps):
        loads.append(os.getloadavg()[0])
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-m", "stageflow", "demo", "--no-cache"],
            capture_output=True,
            text=True,
            check=True,
        )
        walls.append(time.perf_counter() - started)
        assert "answer" in out.stdout
    return {
        "median": statistics.median(walls),
        "min": min(walls),
        "max": max(walls),
        "load": statistics.median(loads),
    }


def main(argv: list[str] | None = None) -> None:
    import os

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=5, help="dev questions for the program runs")
    parser.add_argument(
        "--reps", type=int, default=5, help="repetitions of the prefix-cache and command runs"
    )
    parser.add_argument(
        "--strategies",
        action="store_true",
        help="also compare sequence snapshots with save_state/load_state and one Llama per predictor",
    )
    args = parser.parse_args(argv)

    from stageflow.lm import make_local_lm

    load_median, cold_median = bench_load()
    lm = make_local_lm(cache=False)
    engine = lm.engine
    engine.load()
    speed_load = os.getloadavg()[0]
    speed = bench_speed(engine._model().llama)
    prefix = bench_prefix_cache(engine, args.questions, args.reps)
    strategies = bench_prefix_strategies(engine, args.questions, args.reps) if args.strategies else None
    program = bench_decompose_program(lm, args.questions)
    overhead_load = os.getloadavg()[0]
    overhead = bench_overhead(lm, args.questions)
    command = bench_demo_command(args.reps)

    print(f"# Embedded model: {engine.model_path.name}, n_threads={engine.n_threads}, n_ctx={engine.n_ctx}\n")
    print("| measure | value | load avg |")
    print("|---|---|---|")
    print(f"| load (engine.load(), fresh process, median of 5) | {load_median:.2f} s | |")
    print(f"| import + locate + load (fresh process, median of 5) | {cold_median:.2f} s | |")
    print(
        f"| prompt processing ({speed['prompt_tokens']:.0f}-token prompt) | {speed['pp_median']:.0f} tok/s "
        f"(best {speed['pp_best']:.0f}) | {speed_load:.1f} |"
    )
    print(f"| generation (128 tokens) | {speed['tg_median']:.1f} tok/s (best {speed['tg_best']:.1f}) | |")

    print(
        f"\n# Prefix cache: alternating predictors ({prefix['calls']} calls, decompose/synthesize "
        f"with 4 demos each, {prefix['tokens_per_call']:.0f} prompt tokens per call, max_tokens=1; "
        f"median of {args.reps})\n"
    )
    print("| prefix cache | ms per prompt token (range) | load avg |")
    print("|---|---|---|")
    for name, value in prefix["ms_per_token"].items():
        lo, hi = prefix["ranges"][name]
        print(f"| {name} | {value:.2f} ({lo:.2f}–{hi:.2f}) | {prefix['load']:.1f} |")
    off, on = list(prefix["ms_per_token"].values())
    print(f"\nspeed-up: {off / on:.1f}x")
    if strategies is not None:
        print(f"\n# Ways to keep a prefix per predictor (same calls; median of {args.reps})\n")
        print("| strategy | ms per prompt token | load avg |")
        print("|---|---|---|")
        for name, value in strategies["ms_per_token"].items():
            print(f"| {name} | {value:.2f} | {strategies['load']:.1f} |")
        print(
            f"\n'one Llama per predictor' also loaded {strategies['contexts']} extra contexts in "
            f"{strategies['extra_load_seconds']:.2f} s, adding {strategies['rss_added_mb']:.0f} MB "
            "of resident memory."
        )
    print(f"\n# The decompose program, {args.questions} dev questions (LM cache off)\n")
    print("| prefix cache | s/question | load avg |")
    print("|---|---|---|")
    for value in (0, engine.prefix_slots):
        print(
            f"| prefix_slots={value} | {program[f'slots={value}']:.2f} "
            f"| {program[f'load slots={value}']:.1f} |"
        )

    print(
        f"\n# Demo time outside the model ({overhead['questions']:.0f} dev questions, the default "
        f"architecture as `stageflow demo` runs it; load avg {overhead_load:.1f})\n"
    )
    print("| measure | value |")
    print("|---|---|")
    print(f"| program wall time | {overhead['wall']:.2f} s ({overhead['calls']:.0f} model calls) |")
    print(f"| in llama.cpp (create_chat_completion) | {overhead['in_llama']:.2f} s |")
    print(f"| in the engine (complete(), incl. grammar) | {overhead['in_complete']:.2f} s |")
    print(f"| outside llama.cpp | {overhead['outside_llama_share']:.2%} |")
    print(f"| outside the engine | {overhead['outside_complete_share']:.2%} (target < 2%) |")
    print(f"\n# `python -m stageflow demo --no-cache`, fresh processes, median of {args.reps}\n")
    print("| measure | value | load avg |")
    print("|---|---|---|")
    print(
        f"| command to printed answer | {command['median']:.2f} s "
        f"({command['min']:.2f}–{command['max']:.2f}) | {command['load']:.1f} |"
    )


if __name__ == "__main__":
    main()
