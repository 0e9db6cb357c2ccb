"""Engine overhead: a 10-stage stageflow pipeline vs the same modules composed by hand.

Run: ``python benchmarks/overhead.py`` (prints a Markdown table; numbers go to BENCHMARKS.md).

Variants (each 1 and 10 stages, each stage adds 1 to ``x``):
- plain Python functions;
- hand-written ``dspy.Module`` whose ``forward`` calls the 10 trivial modules;
- ``SequentialPipeline`` of the same trivial modules (sync and ``acall``). The engine calls each
  module as DSPy's ``Module.__call__`` would (``stageflow.engine.module_call``: the same
  ``caller_modules``, callbacks and usage tracking, without its settings copy), so this can cost less
  than the hand-written composition, which pays ``Module.__call__`` per module;
- the same with modules whose class has a ``__call__`` of its own (delegating to DSPy's), which the
  engine must call: DSPy's ``Module.__call__`` runs per stage, as in the hand-written composition, so
  the difference is the engine's own cost (plus that ``__call__``'s frame);
- ``acall`` two ways: one ``run_until_complete`` per call (asyncio's task and loop turns included,
  ~15 µs here) and awaited in a running loop, as an async application calls it (async / sync is
  taken from the latter);
- ``SequentialPipeline`` of plain function stages (the engine alone, no DSPy per stage);
- open contracts: a chain of custom ``dspy.Module`` stages that declare nothing and return
  ``dspy.Prediction`` (each reads the field the one before it produced, so every read is a deferred
  contract check at run time), beside the same chain with ``writes=`` declared;
- nesting: a chain of pipelines nested 1 and 50 deep around one function stage (cost per level).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dspy

import stageflow
from _harness import machine_note, measure, run_async, run_awaited

#: ``acall``s awaited per timed call in the running-loop variants.
PER = 20


class AddOne(dspy.Module):  # type: ignore[misc]
    def forward(self, x: int) -> dspy.Prediction:
        return dspy.Prediction(x=x + 1)

    async def aforward(self, x: int) -> dspy.Prediction:
        return dspy.Prediction(x=x + 1)


class AddOneOwnCall(AddOne):
    """:class:`AddOne` with a ``__call__`` of its own: the engine calls it, so DSPy's
    ``Module.__call__`` runs per stage (as it did for every module stage before 0.2)."""

    def __call__(self, *args: object, **kwargs: object) -> dspy.Prediction:
        return super().__call__(*args, **kwargs)  # type: ignore[no-any-return]


class Hand(dspy.Module):  # type: ignore[misc]
    def __init__(self, n: int) -> None:
        super().__init__()
        self.stages = [AddOne() for _ in range(n)]

    def forward(self, x: int) -> dspy.Prediction:
        for s in self.stages:
            x = s(x=x).x
        return dspy.Prediction(x=x)

    async def aforward(self, x: int) -> dspy.Prediction:
        for s in self.stages:
            x = (await s.acall(x=x)).x
        return dspy.Prediction(x=x)


class Step(dspy.Module):  # type: ignore[misc]
    """A custom module that declares nothing: reads ``v``, returns ``Prediction(<dst>=v + 1)``."""

    def __init__(self, dst: str) -> None:
        super().__init__()
        self.dst = dst

    def forward(self, v: int) -> dspy.Prediction:
        return dspy.Prediction(**{self.dst: v + 1})


def open_chain(n: int, *, declared: bool) -> stageflow.SequentialPipeline:
    """``n`` :class:`Step` stages, stage k reading ``x{k}`` and producing ``x{k+1}``; undeclared (every
    read after the first is deferred to run time) or with ``writes=`` (checked before the run)."""
    return stageflow.SequentialPipeline(
        [
            stageflow.Stage(
                Step(f"x{k + 1}"), inputs={"v": f"x{k}"}, writes=[f"x{k + 1}"] if declared else None
            )
            for k in range(n)
        ]
    )


def nested(depth: int) -> stageflow.SequentialPipeline:
    """One function stage inside ``depth`` nested pipelines."""
    p = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"x": x + 1}, writes=["x"])])
    for _ in range(depth - 1):
        p = stageflow.SequentialPipeline([p])
    return p


def plain(n: int) -> object:
    fns = [lambda x: x + 1 for _ in range(n)]

    def run() -> int:
        x = 0
        for f in fns:
            x = f(x)
        return x

    return run


def main() -> None:
    variants = {}
    for n in (1, 10):
        hand = Hand(n)
        sf = stageflow.SequentialPipeline([AddOne() for _ in range(n)])
        sf_fn = stageflow.SequentialPipeline(
            [stageflow.stage(lambda x: {"x": x + 1}, writes=["x"]) for _ in range(n)]
        )
        sf_kept = stageflow.SequentialPipeline([AddOneOwnCall() for _ in range(n)])
        for p in (hand, sf, sf_fn, sf_kept):
            assert p(x=0).x == n
        variants[f"plain Python x{n}"] = plain(n)
        variants[f"hand-written dspy.Module x{n}"] = lambda hand=hand: hand(x=0)
        variants[f"stageflow SequentialPipeline of dspy.Modules x{n}"] = lambda sf=sf: sf(x=0)
        variants[f"stageflow SequentialPipeline of function stages x{n}"] = lambda sf_fn=sf_fn: sf_fn(x=0)
        variants[f"stageflow, modules with a __call__ of their own x{n}"] = lambda p=sf_kept: p(x=0)
        variants[f"hand-written dspy.Module acall x{n}"] = run_async(lambda hand=hand: hand.acall(x=0))
        variants[f"stageflow acall of dspy.Modules x{n}"] = run_async(lambda sf=sf: sf.acall(x=0))
        variants[f"hand-written acall, awaited in a running loop x{n}"] = run_awaited(
            lambda hand=hand: hand.acall(x=0), PER
        )
        variants[f"stageflow acall, awaited in a running loop x{n}"] = run_awaited(
            lambda sf=sf: sf.acall(x=0), PER
        )
    for n in (1, 10):
        for declared in (False, True):
            chain = open_chain(n, declared=declared)
            assert getattr(chain(x0=0), f"x{n}") == n
            kind = "declared" if declared else "undeclared"
            variants[f"custom modules, {kind} outputs x{n}"] = lambda chain=chain: chain(x0=0)
    for depth in (1, 50):
        deep = nested(depth)
        assert deep(x=0).x == 1
        variants[f"nested pipelines, depth {depth}"] = lambda deep=deep: deep(x=0)
    res = measure(variants)

    def cpu(name: str) -> float:
        return res[name]["cpu_us"] / (PER if "running loop" in name else 1)

    print(f"# Engine overhead ({machine_note()})\n")
    print("| variant | 1 stage µs | 10 stages µs | per stage µs (marginal) |")
    print("|---|---|---|---|")
    kinds = [
        "plain Python",
        "hand-written dspy.Module",
        "stageflow SequentialPipeline of dspy.Modules",
        "stageflow SequentialPipeline of function stages",
        "stageflow, modules with a __call__ of their own",
        "hand-written dspy.Module acall",
        "stageflow acall of dspy.Modules",
        "hand-written acall, awaited in a running loop",
        "stageflow acall, awaited in a running loop",
    ]
    for k in kinds:
        a, b = cpu(f"{k} x1"), cpu(f"{k} x10")
        print(f"| {k} | {a:.1f} | {b:.1f} | {(b - a) / 9:.2f} |")
    hand1, hand10 = cpu("hand-written dspy.Module x1"), cpu("hand-written dspy.Module x10")
    sf1, sf10 = (
        cpu("stageflow SequentialPipeline of dspy.Modules x1"),
        cpu("stageflow SequentialPipeline of dspy.Modules x10"),
    )
    kept1, kept10 = (
        cpu("stageflow, modules with a __call__ of their own x1"),
        cpu("stageflow, modules with a __call__ of their own x10"),
    )
    per_stage_added = ((kept10 - kept1) - (hand10 - hand1)) / 9
    fixed_added = kept1 - hand1 - per_stage_added
    per_stage_diff = ((sf10 - sf1) - (hand10 - hand1)) / 9
    ah10 = cpu("hand-written acall, awaited in a running loop x10")
    as10 = cpu("stageflow acall, awaited in a running loop x10")
    as10_run = cpu("stageflow acall of dspy.Modules x10")
    fn10, fn1 = (
        cpu("stageflow SequentialPipeline of function stages x10"),
        cpu("stageflow SequentialPipeline of function stages x1"),
    )
    print()
    print("| measure | value | target |")
    print("|---|---|---|")
    kept = "own __call__, so DSPy's Module.__call__ runs"
    rows = [
        (f"engine cost added per stage ({kept}; vs hand-written)", f"{per_stage_added:.2f} µs", "≤ 5 µs"),
        (f"fixed cost added per pipeline call ({kept}; vs hand-written)", f"{fixed_added:.1f} µs", "≤ 20 µs"),
        ("per module stage, stageflow − hand-written", f"{per_stage_diff:.2f} µs", ""),
        ("10-stage pipeline / hand-written composition", f"{sf10 / hand10:.2f}×", "≤ 1.25×"),
        (f"the same, modules with an {kept}", f"{kept10 / hand10:.2f}×", ""),
        ("async / sync, 10-stage pipeline, acall awaited in a running loop", f"{as10 / sf10:.2f}×", "≤ 1.2×"),
        ("async / sync, one run_until_complete per acall", f"{as10_run / sf10:.2f}×", ""),
        ("async stageflow / async hand-written, 10 stages (running loop)", f"{as10 / ah10:.2f}×", ""),
        ("engine alone per function stage (marginal)", f"{(fn10 - fn1) / 9:.2f} µs", ""),
    ]
    for measure_name, value, target in rows:
        print(f"| {measure_name} | {value} | {target} |")
    und1, und10 = cpu("custom modules, undeclared outputs x1"), cpu("custom modules, undeclared outputs x10")
    dec1, dec10 = cpu("custom modules, declared outputs x1"), cpu("custom modules, declared outputs x10")
    deferred = ((und10 - und1) - (dec10 - dec1)) / 9
    print(f"| deferred check per stage (undeclared − declared, marginal) | {deferred:.2f} µs | ≤ 1 µs |")
    d1, d50 = cpu("nested pipelines, depth 1"), cpu("nested pipelines, depth 50")
    print(f"| cost per nesting level (depth 50 − depth 1) / 49 | {(d50 - d1) / 49:.2f} µs | ≤ 5 µs |")
    print()
    print("| open contracts and nesting | 1 | 10 / 50 |")
    print("|---|---|---|")
    print(f"| custom modules, undeclared outputs (1 / 10 stages) | {und1:.1f} | {und10:.1f} |")
    print(f"| custom modules, declared outputs (1 / 10 stages) | {dec1:.1f} | {dec10:.1f} |")
    print(f"| nested pipelines (depth 1 / 50) | {d1:.1f} | {d50:.1f} |")


if __name__ == "__main__":
    main()
