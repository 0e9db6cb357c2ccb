"""Multi-hop demo answer quality on the shipped dev set, before and after BootstrapFewShot.

Runs the real embedded model (SmolLM2-135M on llama.cpp, LM cache off), for each prompt style:

1. evaluate the program on the dev set (exact / exact-or-contains match with aliases);
2. compile it with ``BootstrapFewShot`` on the first ``--train`` train questions;
3. evaluate the compiled program on the dev set.

Run: ``python benchmarks/demo_quality.py [--styles standard,compact] [--train 12] [--json out.json]``.
Prints one Markdown table. Takes several minutes per style on a 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from typing import Any

import dspy

from stageflow.apps.multihop import build_program, load_devset, load_trainset
from stageflow.apps.multihop.evaluate import EvalReport, QuestionResult, compile_program, evaluate_program
from stageflow.lm import make_local_lm


def _progress(label: str) -> Any:
    def show(result: QuestionResult) -> None:
        mark = {"exact": "=", "contains": "~", None: "."}[result.match]
        print(mark, end="", file=sys.stderr, flush=True)

    print(f"{label}: ", end="", file=sys.stderr, flush=True)
    return show


def _row(style: str, phase: str, report: EvalReport, extra: str = "") -> str:
    n = report.n
    exact = round(report.exact * n)
    matched = round(report.matched * n)
    return (
        f"| {style} | {phase} | {exact}/{n} ({report.exact:.0%}) | {matched}/{n} ({report.matched:.0%}) "
        f"| {report.mean_seconds:.1f} | {report.errors} | {extra} |"
    )


def run_style(
    style: str, lm: Any, dev: list[Any], train: list[Any], args: argparse.Namespace
) -> dict[str, Any]:
    compact = style == "compact"
    program = build_program(compact=compact)
    adapter = program.adapter()
    before = evaluate_program(program, dev, lm=lm, adapter=adapter, on_result=_progress(f"{style} before"))
    print(file=sys.stderr)
    started = time.perf_counter()
    compiled = compile_program(
        program,
        train,
        lm=lm,
        adapter=adapter,
        max_bootstrapped_demos=args.bootstrapped,
        max_labeled_demos=args.labeled,
    )
    compile_s = time.perf_counter() - started
    demos = {name: len(p.demos) for name, p in compiled.named_predictors()}
    after = evaluate_program(compiled, dev, lm=lm, adapter=adapter, on_result=_progress(f"{style} after"))
    print(file=sys.stderr)
    return {
        "style": style,
        "before": before,
        "after": after,
        "compile_seconds": compile_s,
        "demos": demos,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--styles", default="standard,compact", help="comma-separated: standard, compact")
    parser.add_argument("--train", type=int, default=12, help="train questions used for compiling")
    parser.add_argument("--dev", type=int, default=0, help="limit the dev set (0: all 30)")
    parser.add_argument("--bootstrapped", type=int, default=2, help="max_bootstrapped_demos")
    parser.add_argument("--labeled", type=int, default=4, help="max_labeled_demos")
    parser.add_argument("--json", help="also write per-question results here")
    args = parser.parse_args(argv)

    lm = make_local_lm(cache=False)
    load_s = lm.engine.load()
    dev = load_devset()[: args.dev or None]
    train = load_trainset()[: args.train]
    started = time.perf_counter()
    runs = [run_style(s.strip(), lm, dev, train, args) for s in args.styles.split(",") if s.strip()]
    total = time.perf_counter() - started

    print(f"# Multi-hop demo quality: SmolLM2-135M Q4_1, dev set of {len(dev)} questions\n")
    print(
        f"Compiled with BootstrapFewShot(max_bootstrapped_demos={args.bootstrapped}, "
        f"max_labeled_demos={args.labeled}) on {len(train)} train questions. Model load {load_s:.2f} s; "
        f"total {total / 60:.1f} min.\n"
    )
    print("| prompt style | program | exact | exact or contains | s/question | errors | notes |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        print(_row(run["style"], "uncompiled", run["before"]))
        demos = ", ".join(f"{k}: {v}" for k, v in run["demos"].items())
        note = f"compile {run['compile_seconds']:.0f} s; demos {demos}"
        print(_row(run["style"], "BootstrapFewShot", run["after"], note))
    if args.json:
        out = {
            run["style"]: {phase: [asdict(r) for r in run[phase].results] for phase in ("before", "after")}
            for run in runs
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    dspy.disable_logging() if hasattr(dspy, "disable_logging") else None
    main()
