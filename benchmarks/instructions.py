"""Instructions per call under callgrind: a measure of CPU cost that does not depend on the load.

Run: ``python benchmarks/instructions.py`` (needs ``valgrind``; several minutes: each measure runs
the interpreter twice under callgrind). ``--tree PATH`` measures another checkout's ``src``;
``--only depth1,depth50`` runs some measures (a ratio is printed when its measures ran).

Each measure runs a driver (this file with ``--drive``) ``few`` and ``many`` times after a warm-up,
with ``PYTHONHASHSEED=0``, and reports (instructions(many) − instructions(few)) / (many − few) per
call, so start-up and imports cancel out. Measures: the 10-stage pipeline of trivial modules and the
hand-written composition of ``benchmarks/overhead.py``; one function stage nested 1 and 50 deep;
chains of 1 and 10 custom modules with undeclared and with declared outputs (deferred contract
checks);
``ForEach.acall`` over 2,048 instant ``async def`` items and ``asyncio.gather`` of the same
coroutines (per item); a sync ``ForEach`` over 2,048 instant function items and
``ThreadPoolExecutor(512).map`` of the same function (per item; under callgrind threads take turns,
so this counts the work, not the waiting); three ``dspy.Predict`` calls on an instant ``FakeLM`` in a
pipeline (the fast path) and called by plain DSPy code (per stage call); the same for ten
``Predict("question -> answer")`` on ``lm_cpu.py``'s instant canonical engine (``*10_instant``), and
the same ten called through the stage path ``call_predictor`` with the fast adapter, no pipeline
(``call10_instant``: what a pipeline adds per LM stage is the difference).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ITEMS = 2048
# name: (calls in the short run, calls in the long run, unit divisor per call)
MEASURES = {
    "hand10": (100, 600, 1),
    "sf10": (100, 600, 1),
    "depth1": (50, 300, 1),
    "depth50": (50, 300, 1),
    "undeclared1": (50, 300, 1),
    "undeclared10": (50, 300, 1),
    "declared1": (50, 300, 1),
    "declared10": (50, 300, 1),
    "foreach_acall": (1, 4, ITEMS),
    "gather": (1, 4, ITEMS),
    "foreach_sync": (1, 4, ITEMS),
    "pool_map": (1, 4, ITEMS),
    "predict3": (40, 140, 3),
    "dspy3": (40, 140, 3),
    "predict10_instant": (5, 25, 10),
    "dspy10_instant": (5, 25, 10),
    "call10_instant": (5, 25, 10),
}


def _program(name: str) -> Any:
    sys.path.insert(0, str(HERE))
    import stageflow
    from overhead import AddOne, Hand, nested, open_chain

    if name == "hand10":
        hand = Hand(10)
        return lambda: hand(x=0)
    if name == "sf10":
        sf = stageflow.SequentialPipeline([AddOne() for _ in range(10)])
        return lambda: sf(x=0)
    if name.startswith("depth"):
        deep = nested(int(name[5:]))
        return lambda: deep(x=0)
    if name in ("predict3", "dspy3"):
        return _predictors(name)
    if name in ("predict10_instant", "dspy10_instant", "call10_instant"):
        return _instant_predictors(name)
    if name.startswith(("undeclared", "declared")):
        chain = open_chain(int(name.lstrip("undeclar")), declared=name.startswith("declared"))
        return lambda: chain(x0=0)
    items = list(range(ITEMS))
    if name in ("foreach_sync", "pool_map"):
        return _threads(name, items)
    loop = asyncio.new_event_loop()

    async def item(x: int) -> dict[str, int]:
        await asyncio.sleep(0)
        return {"y": x}

    if name == "foreach_acall":
        each = stageflow.ForEach(stageflow.stage(item, writes=["y"]), over="xs", item="x", collect="ys")
        return lambda: loop.run_until_complete(each.acall(xs=items))

    async def gather() -> None:
        await asyncio.gather(*[item(x) for x in items])

    return lambda: loop.run_until_complete(gather())


def _predictors(name: str) -> Any:
    """Three ``dspy.Predict`` calls on an instant ``FakeLM`` (per stage call): in a stageflow pipeline
    (the fast path), or called one after another by plain DSPy code (DSPy's own adapter)."""
    import dspy

    import stageflow
    from stageflow.testing import FakeLM

    dspy.configure(lm=FakeLM({"answer": "ok", "a1": "x", "a2": "y"}))
    stages = [dspy.Predict("question -> a1"), dspy.Predict("a1 -> a2"), dspy.Predict("a2 -> answer")]
    counter = iter(range(10**9))
    if name == "predict3":
        pipe = stageflow.SequentialPipeline(stages)
        return lambda: pipe(question=f"q{next(counter)}")

    def plain() -> None:
        a1 = stages[0](question=f"q{next(counter)}").a1
        stages[2](a2=stages[1](a1=a1).a2)

    return plain


def _instant_predictors(name: str) -> Any:
    """Ten copies of ``dspy.Predict("question -> answer")`` on the instant canonical engine of
    ``lm_cpu.py`` (DSPy's real LM path, no prompt parsing in the fake): a 10-stage pipeline (the fast
    path), or the ten predictors called by plain DSPy code (per stage call)."""
    import dspy

    import stageflow
    from lm_cpu import make_lm

    module = dspy.Predict("question -> answer")
    stages = [module.deepcopy() for _ in range(10)]
    dspy.configure(lm=make_lm("[[ ## answer ## ]]\nok\n\n[[ ## completed ## ]]"))
    if name == "predict10_instant":
        pipe = stageflow.SequentialPipeline(stages)
        return lambda: pipe(question="q")
    if name == "call10_instant":  # the stage path alone, with the fast adapter: no pipeline around it
        from stageflow.lm.fast import call_predictor, fast_adapter_for

        dspy.configure(adapter=fast_adapter_for(None))

        def direct() -> None:
            for predictor in stages:
                call_predictor(predictor, {"question": "q"})

        return direct

    def plain() -> None:
        for predictor in stages:
            predictor(question="q")

    return plain


def _threads(name: str, items: list[int]) -> Any:
    """A sync ForEach of an instant function stage on stageflow's threads, or the same function
    through a long-lived ``ThreadPoolExecutor`` of the same size (512 workers)."""
    from concurrent.futures import ThreadPoolExecutor

    import stageflow

    def work(x: int) -> dict[str, int]:
        return {"y": x}

    if name == "foreach_sync":
        each = stageflow.ForEach(stageflow.stage(work, writes=["y"]), over="xs", item="x", collect="ys")
        return lambda: each(xs=items)
    pool = ThreadPoolExecutor(512)
    return lambda: list(pool.map(work, items))


def drive(name: str, calls: int) -> None:
    run = _program(name)
    for _ in range(20 if MEASURES[name][2] == 1 else 2):
        run()
    for _ in range(calls):
        run()


def count(tree: Path, name: str, calls: int) -> int:
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(tree / "src")}
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            "valgrind",
            "--tool=callgrind",
            "--max-threads=1100",
            f"--callgrind-out-file={tmp}/cg.out",
            sys.executable,
        ]
        out = subprocess.run(
            [*command, __file__, "--drive", name, str(calls)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count for {name}:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tree", type=Path, default=HERE.parent)
    parser.add_argument("--drive", nargs=2)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="callgrind runs at once")
    parser.add_argument("--only", help="comma-separated measures (default: all); the ratios need their pairs")
    args = parser.parse_args()
    if args.drive:
        drive(args.drive[0], int(args.drive[1]))
        return
    from concurrent.futures import ThreadPoolExecutor

    chosen = args.only.split(",") if args.only else list(MEASURES)
    unknown = sorted(set(chosen) - set(MEASURES))
    if unknown:
        parser.error(f"unknown measures {unknown}; choose from {', '.join(MEASURES)}")
    runs = [(name, calls) for name in chosen for calls in MEASURES[name][:2]]
    with ThreadPoolExecutor(args.jobs) as pool:  # instruction counts do not depend on the load
        counted = dict(zip(runs, pool.map(lambda r: count(args.tree, *r), runs), strict=True))
    res: dict[str, float] = {}
    for name in chosen:
        few, many, per = MEASURES[name]
        res[name] = (counted[name, many] - counted[name, few]) / (many - few) / per / 1000
    print(f"# Instructions (thousands) per call, callgrind, {args.tree}\n")
    print("| measure | K instructions |")
    print("|---|---|")
    for name, value in res.items():
        print(f"| {name}{' (per item)' if MEASURES[name][2] > 1 else ''} | {value:.1f} |")
    ratios = {
        "10-stage pipeline / hand-written": (("sf10", "hand10"), lambda r: f"{r['sf10'] / r['hand10']:.3f}×"),
        "per nesting level ((depth50 − depth1) / 49)": (
            ("depth50", "depth1"),
            lambda r: f"{(r['depth50'] - r['depth1']) / 49:.1f}",
        ),
        "ForEach.acall / asyncio.gather per item": (
            ("foreach_acall", "gather"),
            lambda r: f"{r['foreach_acall'] / r['gather']:.2f}×",
        ),
        "sync ForEach / ThreadPoolExecutor.map per item": (
            ("foreach_sync", "pool_map"),
            lambda r: f"{r['foreach_sync'] / r['pool_map']:.2f}×",
        ),
        "Predict stage in a pipeline / plain dspy.Predict call": (
            ("predict3", "dspy3"),
            lambda r: f"{r['predict3'] / r['dspy3']:.2f}×",
        ),
        "Predict stage in a pipeline / plain dspy.Predict call, instant engine": (
            ("predict10_instant", "dspy10_instant"),
            lambda r: f"{r['predict10_instant'] / r['dspy10_instant']:.2f}×",
        ),
        "pipeline's own cost per Predict stage (predict10_instant − call10_instant)": (
            ("predict10_instant", "call10_instant"),
            lambda r: f"{r['predict10_instant'] - r['call10_instant']:.1f}",
        ),
        "deferred contract check per stage (undeclared − declared, marginal)": (
            ("undeclared10", "undeclared1", "declared10", "declared1"),
            lambda r: f"{(r['undeclared10'] - r['undeclared1'] - r['declared10'] + r['declared1']) / 9:.1f}",
        ),
    }
    for label, (needs, show) in ratios.items():
        if all(n in res for n in needs):
            print(f"| {label} | {show(res)} |")


if __name__ == "__main__":
    main()
