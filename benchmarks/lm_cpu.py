"""CPU per LM call: plain DSPy vs the fast adapters, and prototypes of a stage-level call path.

Run: ``python benchmarks/lm_cpu.py [--reps 15] [--profile]`` (prints Markdown tables; numbers go to
BENCHMARKS.md).

The LM is a canonical DSPy 3.4 engine that returns a prebuilt answer instantly, so every call runs
DSPy's real adapter and LM path (``prepare`` → lm15 request → engine → result → history) and only
the network is gone. Workloads: ``Predict("question -> answer")``, ``ChainOfThought`` of it, and a
typed retrieval-style ``Predict`` (a ``list[str]`` context, a ``float`` output) with 3 demos, each
through ``ChatAdapter`` and ``JSONAdapter``. Variants per workload, side by side in one run:

* ``plain``: the DSPy call as users write it (DSPy's adapter).
* ``fast adapter``: the same call with the fast twin installed (``dspy.context(adapter=...)``).
* ``stageflow stage, fast off/on``: the predictor as a one-stage ``SequentialPipeline`` (the
  pipeline's fixed cost per invocation included), and per stage of a 10-stage pipeline of copies;
  "off" / "on": DSPy's adapter or its fast twin configured around the call (the pipeline installs
  the twin either way, with its fast path on by default).
* ``+ stage path (P1)``: ``stageflow.lm.fast.call_predictor`` alone, what the engine calls instead
  of ``predictor(**kw)``: ``Predict``'s own steps around the adapter from a per-signature table
  (DSPy's methods for anything unusual), skipping ``Module.__call__``'s callback wrapper (when no
  callbacks are active), ``resolve_adapter`` (when the signature has no decision outputs), the
  ``send_stream=None`` context (when no stream is open) and ``ChainOfThought``'s ``forward`` hop.
  History, traces, usage and the LM cache see the same calls (tested).
* ``+ P2``: P1, with the ``caller_modules`` push done by one context-variable set instead of
  ``dspy.context`` (which copies the whole settings dict).
* ``+ P3 (DSPy LM layer)``: P2 plus memoising DSPy's OpenAI-messages → lm15 request conversion
  (a monkeypatch of ``dspy.clients.execution.request_from_openai_chat``): what a change inside
  DSPy's LM layer would give. Not something stageflow should ship.
* ``+ P4`` (async only): P2 with the two ``asyncio.to_thread`` hops of DSPy's async LM call
  (request preparation, pricing) run inline — another DSPy-internal change, measured only.
* ``history off``: P2 with ``disable_history=True`` — *changes* what history sees; shown only to
  size the cost of history recording.

Ratios are CPU time per call against ``plain`` of the same workload: medians of the ratios
within each of the rotated repetitions (paired, so machine-speed drift cancels).
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
from dspy.dsp.utils.settings import settings, thread_local_overrides
from dspy.lm15 import Message, Response, Usage

import stageflow
from _harness import calibrate, dspy_untouched, machine_note
from stageflow.lm.fast import (
    acall_predictor,
    call_predictor,
    fast_adapter_for,
    fast_path_stats,
    reset_fast_path_stats,
)
from stageflow.lm.fast._predict import postprocess
from stageflow.lm.fast.call import _prepare, short_path

# -- an instant canonical engine ----------------------------------------------------------------


class InstantEngine:
    """Returns one prebuilt response (DSPy 3.4 canonical engine: ``complete(Request) -> Response``),
    after ``latency`` seconds of sleep (none by default)."""

    def __init__(self, text: str, latency: float = 0.0) -> None:
        self.latency = latency
        self.response = Response(
            id=None,
            model="fake/lm",
            message=Message.assistant(text),
            finish_reason="stop",
            usage=Usage(input_tokens=10, output_tokens=5, total_tokens=15),
        )

    def complete(self, request: Any) -> Response:
        if self.latency:
            time.sleep(self.latency)
        return self.response

    def close(self) -> None:
        return None


class AsyncInstantEngine(InstantEngine):
    async def complete(self, request: Any) -> Response:  # type: ignore[override]
        if self.latency:
            await asyncio.sleep(self.latency)
        return self.response

    async def aclose(self) -> None:
        return None


def make_lm(text: str, latency: float = 0.0) -> dspy.LM:
    return dspy.LM(
        "fake/lm",
        engine=InstantEngine(text, latency),
        async_engine=AsyncInstantEngine(text, latency),
        cache=False,
        num_retries=0,
    )


# -- the stage-level call path (P1: stageflow.lm.fast.call_predictor) and a prototype P2 ----------


def stage_call(module: Any, kw: dict[str, Any], direct: bool = False) -> Any:
    """P1 (``direct=False``): ``call_predictor``. P2: the same with ``caller_modules`` pushed by one
    context-variable set instead of ``dspy.context`` (which copies every setting)."""
    if not direct:
        return call_predictor(module, kw)
    chain = short_path(module)
    if chain is None:
        return module(**kw)
    p = chain[-1]
    token = thread_local_overrides.set(
        {**thread_local_overrides.get(), "caller_modules": [*(settings.caller_modules or []), *chain]}
    )
    try:
        adapter, lm, config, signature, demos, kwargs, *checked = _prepare(p, vars(p), kw, True)
        extra = (
            {"_checked": checked[0]} if checked and checked[0] is not None else {}
        )  # (trees before 9cd077d: none)
        completions = adapter(lm, lm_kwargs=config, signature=signature, demos=demos, inputs=kwargs, **extra)
        return postprocess(p, completions, signature, kwargs)
    finally:
        thread_local_overrides.reset(token)


async def astage_call(module: Any, kw: dict[str, Any], direct: bool = False) -> Any:
    """Async twin of :func:`stage_call`."""
    if not direct:
        return await acall_predictor(module, kw)
    chain = short_path(module)
    if chain is None:
        return await module.acall(**kw)
    p = chain[-1]
    token = thread_local_overrides.set(
        {**thread_local_overrides.get(), "caller_modules": [*(settings.caller_modules or []), *chain]}
    )
    try:
        adapter, lm, config, signature, demos, kwargs, *checked = _prepare(p, vars(p), kw, True)
        extra = {"_checked": checked[0]} if checked and checked[0] is not None else {}
        completions = await adapter.acall(
            lm, lm_kwargs=config, signature=signature, demos=demos, inputs=kwargs, **extra
        )
        return postprocess(p, completions, signature, kwargs)
    finally:
        thread_local_overrides.reset(token)


@contextlib.contextmanager
def memoised_request_conversion() -> Iterator[None]:
    """P3: memoise DSPy's messages → lm15 request conversion (a DSPy-internal change; measured only)."""
    from dspy.clients import execution

    original = execution.request_from_openai_chat
    memo: dict[Any, Any] = {}

    def convert(body: dict[str, Any], compat: Any = None) -> Any:
        try:
            key = (
                tuple((m["role"], m["content"]) for m in body["messages"]),
                tuple(sorted((k, v) for k, v in body.items() if k != "messages")),
                compat,
            )
            hash(key)
        except (TypeError, KeyError):
            return original(body, compat=compat)
        found = memo.get(key)
        if found is None:
            if len(memo) > 4096:
                memo.clear()
            found = memo[key] = original(body, compat=compat)
        return found

    execution.request_from_openai_chat = convert
    try:
        yield
    finally:
        execution.request_from_openai_chat = original


@contextlib.contextmanager
def inline_thread_hops() -> Iterator[None]:
    """P4: run the two ``asyncio.to_thread`` hops of DSPy's async LM call (request preparation,
    pricing) inline on the event loop — a DSPy-internal change for text-only prompts; measured only."""
    from dspy.clients import execution

    original = asyncio.to_thread
    inline = {execution.prepare, execution._price_result}

    async def to_thread(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        if func in inline:
            return func(*args, **kwargs)
        return await original(func, *args, **kwargs)

    asyncio.to_thread = to_thread  # type: ignore[assignment]
    try:
        yield
    finally:
        asyncio.to_thread = original


# -- workloads ------------------------------------------------------------------------------------


class Retrieval(dspy.Signature):
    """Answer the question from the passages; say how sure you are."""

    context: list[str] = dspy.InputField(desc="retrieved passages")
    question: str = dspy.InputField()
    answer: str = dspy.OutputField(desc="a short answer")
    confidence: float = dspy.OutputField(desc="0 to 1")


def _answer(kind: str, fields: dict[str, Any]) -> str:
    if kind == "json":
        import json

        return json.dumps(fields)
    return "".join(f"[[ ## {k} ## ]]\n{v}\n\n" for k, v in fields.items()) + "[[ ## completed ## ]]"


def workloads() -> dict[str, tuple[Any, dict[str, Any], dict[str, Any]]]:
    """name -> (module, inputs, answer fields)."""
    rag = dspy.Predict(Retrieval)
    rag.demos = [
        dspy.Example(
            context=[f"passage {i}.1 about topic {i}", f"passage {i}.2"],
            question=f"question {i}?",
            answer=f"answer {i}",
            confidence=0.8,
        )
        for i in range(3)
    ]
    passages = ["Paris is the capital of France.", "France is in Europe.", "The Seine flows through Paris."]
    return {
        "Predict": (dspy.Predict("question -> answer"), {"question": "q"}, {"answer": "ok"}),
        "ChainOfThought": (
            dspy.ChainOfThought("question -> answer"),
            {"question": "q"},
            {"reasoning": "because", "answer": "ok"},
        ),
        "typed Predict + 3 demos": (
            rag,
            {"context": passages, "question": "What is the capital of France?"},
            {"answer": "Paris", "confidence": 0.9},
        ),
    }


STAGES = 10
Variant = tuple[dict[str, Any], Callable[[], Any], Callable[[], contextlib.AbstractContextManager[Any]]]


def variants_for(module: Any, inputs: dict[str, Any], lm: Any, kind: str) -> dict[str, Variant]:
    plain_adapter = dspy.JSONAdapter() if kind == "json" else None
    fast = fast_adapter_for(plain_adapter)
    pipeline = stageflow.SequentialPipeline([module])
    ten = stageflow.SequentialPipeline([module.deepcopy() for _ in range(STAGES)])
    none = contextlib.nullcontext
    ctx_plain = {"lm": lm, "adapter": plain_adapter}
    ctx_fast = {"lm": lm, "adapter": fast}
    return {
        "plain": (ctx_plain, lambda: module(**inputs), dspy_untouched),
        "fast adapter": (ctx_fast, lambda: module(**inputs), dspy_untouched),
        "stageflow stage, fast off": (ctx_plain, lambda: pipeline(**inputs), none),
        "stageflow stage, fast on": (ctx_fast, lambda: pipeline(**inputs), none),
        f"stageflow {STAGES}-stage pipeline, fast off (per stage)": (ctx_plain, lambda: ten(**inputs), none),
        f"stageflow {STAGES}-stage pipeline, fast on (per stage)": (ctx_fast, lambda: ten(**inputs), none),
        "+ stage path (P1)": (ctx_fast, lambda: stage_call(module, inputs), none),
        "+ P2 (direct caller push)": (ctx_fast, lambda: stage_call(module, inputs, True), none),
        "+ P3 (DSPy LM layer memo)": (
            ctx_fast,
            lambda: stage_call(module, inputs, True),
            memoised_request_conversion,
        ),
        "P2, history off (changes history)": (
            {**ctx_fast, "disable_history": True},
            lambda: stage_call(module, inputs, True),
            none,
        ),
    }


def measure(variants: dict[str, Variant], reps: int) -> dict[str, tuple[float, float]]:
    """Per variant: (median CPU µs per call, median of per-repetition ratios to the first variant).

    Each repetition runs every variant once, in rotated order; pairing the ratios within a
    repetition keeps them steady when the machine's speed drifts.
    """
    loops = {}
    for name, (ctx, fn, extra) in variants.items():
        with dspy.context(**ctx), extra():
            loops[name] = calibrate(fn, 0.04)
    cpu: dict[str, list[float]] = {n: [] for n in variants}
    names = list(variants)
    for r in range(reps):
        gc.collect()
        for name in names[r % len(names) :] + names[: r % len(names)]:
            ctx, fn, extra = variants[name]
            n = loops[name]
            with dspy.context(**ctx), extra():
                c0 = time.process_time()
                for _ in range(n):
                    fn()
                cpu[name].append((time.process_time() - c0) / n * 1e6)
    first = cpu[names[0]]
    return {
        n: (statistics.median(v), statistics.median(x / b for x, b in zip(v, first, strict=True)))
        for n, v in cpu.items()
    }


def parts(lm: Any, kind: str, reps: int) -> dict[str, tuple[float, float]]:
    """One Predict("question -> answer") call taken apart: adapter format/parse, LM, engine."""
    from dspy.clients._deprecation import adapter_message_call

    sig = dspy.Predict("question -> answer").signature
    plain = dspy.JSONAdapter() if kind == "json" else dspy.ChatAdapter()
    fast = fast_adapter_for(plain)
    msgs = plain.format(sig, [], {"question": "q"})
    text = _answer(kind, {"answer": "ok"})

    def lm_call() -> Any:
        with adapter_message_call(lm, msgs):
            return lm(messages=msgs)

    engine = lm._engine_spec
    ctx = {"lm": lm}
    none = contextlib.nullcontext
    return measure(
        {
            "DSPy adapter.format": (ctx, lambda: plain.format(sig, [], {"question": "q"}), none),
            "fast adapter.format": (ctx, lambda: fast.format(sig, [], {"question": "q"}), none),
            "DSPy adapter.parse": (ctx, lambda: plain.parse(sig, text), none),
            "fast adapter.parse": (ctx, lambda: fast.parse(sig, text), none),
            "LM(messages=...)": (ctx, lm_call, none),
            "LM(messages=...), history off": ({**ctx, "disable_history": True}, lm_call, none),
            "engine.complete": (ctx, lambda: engine.complete(None), none),
        },
        reps,
    )


def async_variants(reps: int) -> dict[str, tuple[float, float]]:
    """Predict.acall vs the fast adapter vs the async stage path (one persistent loop)."""
    loop = asyncio.new_event_loop()
    module, inputs, fields = workloads()["Predict"]
    lm = make_lm(_answer("chat", fields))
    fast = fast_adapter_for(None)

    def on_loop(coro_fn: Callable[[], Any]) -> Callable[[], Any]:
        return lambda: loop.run_until_complete(coro_fn())

    none = contextlib.nullcontext
    out = measure(
        {
            "Predict.acall": ({"lm": lm}, on_loop(lambda: module.acall(**inputs)), dspy_untouched),
            "Predict.acall, fast adapter": (
                {"lm": lm, "adapter": fast},
                on_loop(lambda: module.acall(**inputs)),
                dspy_untouched,
            ),
            "async stage path (P1, acall_predictor)": (
                {"lm": lm, "adapter": fast},
                on_loop(lambda: astage_call(module, inputs)),
                none,
            ),
            "async stage path (P2)": (
                {"lm": lm, "adapter": fast},
                on_loop(lambda: astage_call(module, inputs, True)),
                none,
            ),
            "+ P4 (DSPy LM layer: no thread hops)": (
                {"lm": lm, "adapter": fast},
                on_loop(lambda: astage_call(module, inputs, True)),
                inline_thread_hops,
            ),
            "+ P3 + P4": (
                {"lm": lm, "adapter": fast},
                on_loop(lambda: astage_call(module, inputs, True)),
                lambda: _both(memoised_request_conversion(), inline_thread_hops()),
            ),
        },
        reps,
    )
    json_lm = make_lm(_answer("json", fields))
    plain_json = dspy.JSONAdapter()
    out.update(
        measure(
            {
                "Predict.acall, JSONAdapter": (
                    {"lm": json_lm, "adapter": plain_json},
                    on_loop(lambda: module.acall(**inputs)),
                    dspy_untouched,
                ),
                "async stage path (P1, acall_predictor), fast JSONAdapter": (
                    {"lm": json_lm, "adapter": fast_adapter_for(plain_json)},
                    on_loop(lambda: astage_call(module, inputs)),
                    none,
                ),
            },
            reps,
        )
    )
    loop.close()
    return out


@contextlib.contextmanager
def _both(a: Any, b: Any) -> Iterator[None]:
    with a, b:
        yield


def profile() -> None:
    import cProfile
    import pstats

    module, inputs, fields = workloads()["Predict"]
    lm = make_lm(_answer("chat", fields))
    with dspy.context(lm=lm, adapter=fast_adapter_for(None)):
        for _ in range(200):
            stage_call(module, inputs, True)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3000):
            stage_call(module, inputs, True)
        prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(40)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--profile", action="store_true", help="cProfile the P2 stage path instead")
    args = parser.parse_args()
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("dspy").setLevel(logging.ERROR)
    if args.profile:
        profile()
        return
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    print(f"# CPU per LM call, instant fake LM ({machine_note()}; reps={args.reps})\n")
    reset_fast_path_stats()
    for kind in ("chat", "json"):
        rows = []
        for name, (module, inputs, fields) in workloads().items():
            lm = make_lm(_answer(kind, fields))
            result = measure(variants_for(module, inputs, lm, kind), args.reps)
            for v, (us, ratio) in result.items():
                if "(per stage)" in v:
                    result[v] = (us / STAGES, ratio / STAGES)
            rows.append((name, result))
        adapter = "ChatAdapter" if kind == "chat" else "JSONAdapter"
        print(f"## {adapter}: CPU µs per call (ratio to plain DSPy)\n")
        names = list(rows[0][1])
        print("| variant | " + " | ".join(r[0] for r in rows) + " |")
        print("|---|" + "---|" * len(rows))
        for v in names:
            cells = " | ".join(f"{r[1][v][0]:.0f} ({r[1][v][1]:.2f}×)" for r in rows)
            print(f"| {v} | {cells} |")
        print()
    print("## One Predict call taken apart (CPU µs; ChatAdapter)\n")
    pieces = parts(make_lm(_answer("chat", {"answer": "ok"})), "chat", args.reps)
    print("| part | µs |\n|---|---|")
    for k, (us, _) in pieces.items():
        print(f"| {k} | {us:.1f} |")
    print("\n## Async (CPU µs per call, one persistent event loop)\n")
    asy = async_variants(args.reps)
    print("| variant | µs | ratio (to the Predict.acall row of its adapter) |\n|---|---|---|")
    for k, (us, ratio) in asy.items():
        print(f"| {k} | {us:.0f} | {ratio:.2f}× |")
    stats = fast_path_stats()
    print(f"\nfast path: {stats.fast_calls} fast calls, fallbacks {stats.fallbacks or 'none'}")


if __name__ == "__main__":
    main()
