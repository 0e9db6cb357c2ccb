"""What observing a run costs: no observer, the profiler, the tracer, OpenTelemetry.

Run: ``python benchmarks/observability.py`` (prints Markdown tables; numbers go to BENCHMARKS.md).
Needs ``opentelemetry-sdk`` (in ``stageflow[dev]``).

A pipeline of 1 and of 10 trivial stages (each adds 1 to ``x``), side by side in one run; the cost
per stage is the marginal one, ``(t10 - t1) / 9``, minus that of the same pipeline with no observer.
Two kinds of trivial stage: function stages (the engine alone) and ``dspy.Module`` stages (with
OpenTelemetry, stageflow's DSPy callbacks for LM spans are active during the call, and DSPy runs
its callback machinery on every module call).

Variants:
- no observer;
- ``stageflow.profile()`` (one profiler for every call);
- ``stageflow.trace()`` (a new tracer per call, content recorded);
- OpenTelemetry: ``instrument(tracer_provider=...)`` with the SDK, a ``SimpleSpanProcessor`` and
  the in-memory exporter (cleared after each call);
- the same with ``lm_spans=False`` (no LM-call spans: DSPy's callbacks stay off);
- OpenTelemetry installed but no tracer provider: ``instrument()`` (it installs nothing);
- for reference, the OpenTelemetry hook forced onto the API's no-op tracer: what ``instrument()``
  would cost without a provider if it installed the hook anyway.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dspy
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import stageflow
from _harness import machine_note, measure
from stageflow.engine.hooks import attach_hooks
from stageflow.observe import otel


class AddOne(dspy.Module):  # type: ignore[misc]
    def forward(self, x: int) -> dspy.Prediction:
        return dspy.Prediction(x=x + 1)


def pipelines(kind: str, n: int) -> stageflow.SequentialPipeline:
    if kind == "function":
        return stageflow.SequentialPipeline(
            [stageflow.stage(lambda x: {"x": x + 1}, writes=["x"]) for _ in range(n)]
        )
    return stageflow.SequentialPipeline([AddOne() for _ in range(n)])


def main() -> None:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert otel.instrument() is None, "a global tracer provider is set: this benchmark needs none"
    sdk_hook = otel.OtelHook(provider.get_tracer("bench"))
    sdk_hook_no_lm = otel.OtelHook(provider.get_tracer("bench"), lm_spans=False)
    noop_hook = otel.OtelHook(otel_trace.NoOpTracerProvider().get_tracer("bench"))
    prof = stageflow.Profiler()

    def plain(p: Any) -> Callable[[], Any]:
        return lambda: p(x=0)

    def profiled(p: Any) -> Callable[[], Any]:
        def run() -> Any:
            with stageflow.profile(prof):
                return p(x=0)

        return run

    def traced(p: Any) -> Callable[[], Any]:
        def run() -> Any:
            with stageflow.trace():
                return p(x=0)

        return run

    def with_hook(p: Any, hook: Any, clear: bool) -> Callable[[], Any]:
        def run() -> Any:
            with attach_hooks(hook):
                out = p(x=0)
            if clear:
                exporter.clear()
            return out

        return run

    observers: dict[str, Callable[[Any], Callable[[], Any]]] = {
        "no observer": plain,
        "profiler": profiled,
        "tracer": traced,
        "OpenTelemetry, SDK + in-memory exporter": lambda p: with_hook(p, sdk_hook, True),
        "OpenTelemetry, SDK + in-memory exporter, lm_spans=False": lambda p: with_hook(
            p, sdk_hook_no_lm, True
        ),
        "OpenTelemetry installed, no tracer provider (instrument_otel() installs nothing)": plain,
        "(reference) OpenTelemetry hook on the API's no-op tracer": lambda p: with_hook(p, noop_hook, False),
    }
    variants: dict[str, Callable[[], Any]] = {}
    for kind in ("function", "module"):
        for n in (1, 10):
            p = pipelines(kind, n)
            assert p(x=0).x == n
            for name, wrap in observers.items():
                variants[f"{name}|{kind}|{n}"] = wrap(p)
    bare = provider.get_tracer("bare")

    def sdk_span() -> None:
        bare.start_span("stage").end()
        exporter.clear()

    variants["(reference) one bare SDK span: start_span + end, no stageflow"] = sdk_span
    res = measure(variants)
    spans_per_call = len(exporter.get_finished_spans())
    assert spans_per_call == 0  # cleared after every call

    def cpu(name: str, kind: str, n: int) -> float:
        return res[f"{name}|{kind}|{n}"]["cpu_us"]

    print(f"# Cost of observing a run ({machine_note()})\n")
    print("CPU µs per pipeline call (median); per stage = marginal cost added over no observer.\n")
    print("| observer | stages | 1 stage µs | 10 stages µs | added per stage µs | added per call µs |")
    print("|---|---|---|---|---|---|")
    for kind in ("function", "module"):
        b1, b10 = cpu("no observer", kind, 1), cpu("no observer", kind, 10)
        for name in observers:
            a1, a10 = cpu(name, kind, 1), cpu(name, kind, 10)
            per_stage = ((a10 - a1) - (b10 - b1)) / 9
            fixed = (a1 - b1) - per_stage
            label = "function stages" if kind == "function" else "dspy.Module stages"
            print(f"| {name} | {label} | {a1:.1f} | {a10:.1f} | {per_stage:.2f} | {fixed:.1f} |")
    print()
    print("| measure (function stages) | value | target |")
    print("|---|---|---|")

    def added(name: str, kind: str = "function") -> float:
        b1, b10 = cpu("no observer", kind, 1), cpu("no observer", kind, 10)
        return ((cpu(name, kind, 10) - cpu(name, kind, 1)) - (b10 - b1)) / 9

    print(f"| tracer, added per stage | {added('tracer'):.2f} µs | ≤ 30 µs |")
    otel_name = "OpenTelemetry, SDK + in-memory exporter"
    otel_added = added(otel_name)
    print(f"| OpenTelemetry (SDK, in-memory exporter), added per stage | {otel_added:.2f} µs | ≤ 30 µs |")
    none_name = "OpenTelemetry installed, no tracer provider (instrument_otel() installs nothing)"
    print(f"| OpenTelemetry installed, no provider, added per stage | {added(none_name):.2f} µs | ≤ 1 µs |")
    print(f"| profiler, added per stage | {added('profiler'):.2f} µs | |")
    span_us = res["(reference) one bare SDK span: start_span + end, no stageflow"]["cpu_us"]
    print(f"| (reference) one bare SDK span, start + end + export | {span_us:.2f} µs | |")
    print(f"| OpenTelemetry per stage beyond a bare SDK span | {otel_added - span_us:.2f} µs | |")
    ratio = cpu(otel_name, "function", 10) / cpu("no observer", "function", 10)
    print(f"| OpenTelemetry / no observer, 10 function stages | {ratio:.2f}× | |")


if __name__ == "__main__":
    main()
