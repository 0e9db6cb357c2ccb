"""The ``decompose`` architecture's answer quality on the shipped dev set, before and after
BootstrapFewShot (``benchmarks/architectures.py`` compares it with the other architectures).

Runs the real embedded model (SmolLM2-135M on llama.cpp, LM cache off), for each prompt style:

1. evaluate the program on the dev set (exact / exact-or-contains match with aliases);
2. compile it with ``BootstrapFewShot`` on the first ``--train`` train questions;
3. evaluate the compiled program on the dev set.

Optionally (``--labeled-only K``) also with K labeled train demos per predictor and no compiling, which
is what ``stageflow demo --architecture decompose`` does on the local model.

Run: ``python benchmarks/demo_quality.py [--styles standard,compact] [--train 12] [--json out.json]``.
Prints one Markdown table. On a 2-core machine under load, the compact style took 14.5 min (30 dev
questions twice, compiling on 12 train questions) and the standard style 23 min; use
``--styles compact`` or a smaller ``--train`` for a shorter run.
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
from stageflow.apps.multihop.evaluate import (
    EvalReport,
    QuestionResult,
    compile_program,
    evaluate_program,
    with_train_demos,
)
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
    before = None
    if not args.no_baseline:
        before = evaluate_program(
            program, dev, lm=lm, adapter=adapter, on_result=_progress(f"{style} before")
        )
        print(file=sys.stderr)
    labeled = None
    if args.labeled_only:
        shown = with_train_demos(program, args.labeled_only)
        labeled = evaluate_program(
            shown, dev, lm=lm, adapter=adapter, on_result=_progress(f"{style} labeled")
        )
        print(file=sys.stderr)
    if args.no_compile:
        return {"style": style, "before": before, "labeled": labeled, "after": None}
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
        "labeled": labeled,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--styles", default="standard,compact", help="comma-separated: standard, compact")
    parser.add_argument("--train", type=int, default=12, help="train questions used for compiling")
    parser.add_argument("--dev", type=int, default=0, help="limit the dev set (0: all 30)")
    parser.add_argument("--bootstrapped", type=int, default=2, help="max_bootstrapped_demos")
    parser.add_argument("--labeled", type=int, default=4, help="max_labeled_demos")
    parser.add_argument(
        "--labeled-only",
        type=int,
        default=0,
        metavar="K",
        help="also evaluate with K labeled train demos per predictor (LabeledFewShot, no model calls)",
    )
    parser.add_argument("--no-compile", action="store_true", help="skip BootstrapFewShot")
    parser.add_argument("--no-baseline", action="store_true", help="skip the uncompiled evaluation")
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
    phases = ("before", "labeled", "after")
    for run in runs:
        if run["before"] is not None:
            print(_row(run["style"], "uncompiled", run["before"]))
        if run["labeled"] is not None:
            note = "train demos only, no model calls to compile"
            print(_row(run["style"], f"LabeledFewShot(k={args.labeled_only})", run["labeled"], note))
        if run["after"] is not None:
            demos = ", ".join(f"{k}: {v}" for k, v in run["demos"].items())
            note = f"compile {run['compile_seconds']:.0f} s; demos {demos}"
            print(_row(run["style"], "BootstrapFewShot", run["after"], note))
    if args.json:
        out = {
            run["style"]: {p: [asdict(r) for r in run[p].results] for p in phases if run[p] is not None}
            for run in runs
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    dspy.disable_logging() if hasattr(dspy, "disable_logging") else None
    main()
