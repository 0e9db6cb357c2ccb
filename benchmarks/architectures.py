"""The multi-hop QA architectures side by side on the shipped dev set, including a no-model control.

For each architecture of ``stageflow.apps.multihop.architectures`` (embedded SmolLM2-135M on
llama.cpp, DSPy's LM cache off, the engine's prefix cache on): exact match and exact-or-contains
match with aliases, supporting-passage recall (mean share of each question's supporting passages
the program read, and the questions where it read all of them), LM calls and seconds per question.

Answers are deterministic (temperature 0); ``--repeat R`` runs every architecture R times in rotated
order, checks that the answers repeat, and reports the median seconds per question. The load average
is printed beside the timings: the machine is shared, so compare ratios within one run.

Run: ``python benchmarks/architectures.py [--repeat 3] [--only linked-choose,linked-first] [--json f]``
(about 10 minutes per repetition on 2 cores, most of it the ``decompose`` architecture).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any

import dspy

from stageflow.apps.multihop import load_devset
from stageflow.apps.multihop.architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE, build_architecture
from stageflow.apps.multihop.evaluate import EvalReport, QuestionResult, evaluate_program
from stageflow.lm import make_local_lm


def _progress(label: str) -> Any:
    print(f"{label}: ", end="", file=sys.stderr, flush=True)

    def show(result: QuestionResult) -> None:
        mark = {"exact": "=", "contains": "~", None: "."}[result.match]
        print("E" if result.error else mark, end="", file=sys.stderr, flush=True)

    return show


def run_once(name: str, lm: Any, dev: list[Any]) -> tuple[EvalReport, float]:
    program = build_architecture(name)
    load = os.getloadavg()[0]
    report = evaluate_program(program, dev, lm=lm, adapter=program.adapter(), on_result=_progress(name))
    print(f"  ({report.mean_seconds:.2f} s/question, load {load:.1f})", file=sys.stderr)
    return report, load


def _row(name: str, report: EvalReport, seconds: list[float], loads: list[float]) -> str:
    n = report.n
    exact, matched = round(report.exact * n), round(report.matched * n)
    recall = "—" if report.recall is None else f"{report.recall:.2f} ({report.all_found}/{n})"
    default = " (default)" if name == DEFAULT_ARCHITECTURE else ""
    spread = f"{min(seconds):.2f}–{max(seconds):.2f}" if len(seconds) > 1 else f"{seconds[0]:.2f}"
    return (
        f"| {name}{default} | {exact}/{n} | {matched}/{n} | {recall} | {report.lm_calls:.1f} "
        f"| {statistics.median(seconds):.2f} ({spread}) | {statistics.median(loads):.1f} |"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated architecture names (default: all)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per architecture, rotated order")
    parser.add_argument("--dev", type=int, default=0, help="limit the dev set (0: all 30)")
    parser.add_argument("--json", help="also write per-question results here")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(ARCHITECTURES)
    dev = load_devset()[: args.dev or None]
    lm = make_local_lm(cache=False)
    load_s = lm.engine.load()
    reports: dict[str, EvalReport] = {}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    loads: dict[str, list[float]] = {n: [] for n in names}
    started = time.perf_counter()
    for rep in range(args.repeat):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            report, load = run_once(name, lm, dev)
            previous = reports.setdefault(name, report)
            if [r.answer for r in previous.results] != [r.answer for r in report.results]:
                print(f"WARNING: {name} answered differently in repetition {rep + 1}", file=sys.stderr)
            seconds[name].append(report.mean_seconds)
            loads[name].append(load)
    total = time.perf_counter() - started

    engine = lm.engine
    print(
        f"# Multi-hop architectures: {engine.model_path.name}, n_threads={engine.n_threads}, "
        f"dev set of {len(dev)} questions\n"
    )
    print(
        f"LM cache off, prefix cache on; model load {load_s:.2f} s; {args.repeat} repetition(s), "
        f"total {total / 60:.1f} min; cores {os.cpu_count()}.\n"
    )
    print(
        "| architecture | exact | exact or contains | recall (all found) | LM calls/q | s/question "
        "median (range) | load avg |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        print(_row(name, reports[name], seconds[name], loads[name]))
    if args.json:
        out = {name: [asdict(r) for r in reports[name].results] for name in names}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    dspy.disable_logging() if hasattr(dspy, "disable_logging") else None
    main()
