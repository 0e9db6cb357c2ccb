"""The multi-hop QA architectures side by side on the shipped dev set, including a no-model control.

For each architecture of ``stageflow.apps.multihop.architectures`` (embedded SmolLM2-135M on
llama.cpp, DSPy's LM cache off, the engine's prefix cache on): exact match and exact-or-contains
match with aliases, supporting-passage recall (mean share of each question's supporting passages
the program read, and the questions where it read all of them), LM calls and seconds per question.

Answers are deterministic (temperature 0); ``--repeat R`` runs every architecture R times in rotated
order, checks that the answers repeat, and reports the median seconds per question. The load average
is printed beside the timings: the machine is shared, so compare ratios within one run.

Run: ``python benchmarks/architectures.py [--repeat 3] [--only linked-choose,linked-first] [--set train]``
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

from stageflow.apps.multihop import load_devset, load_trainset
from stageflow.apps.multihop.architectures import ARCHITECTURES, DEFAULT_ARCHITECTURE, build_architecture
from stageflow.apps.multihop.evaluate import EvalReport, QuestionResult, evaluate_program
from stageflow.lm import make_local_lm


def _progress(label: str) -> Any:
    print(f"{label}: ", end="", file=sys.stderr, flush=True)

    def show(result: QuestionResult) -> None:
        mark = {"exact": "=", "contains": "~", None: "."}[result.match]
        print("E" if result.error else mark, end="", file=sys.stderr, flush=True)

    return show


def retrieval_table(questions: list[Any]) -> list[str]:
    """Recall of retrieval alone (no model): BM25 on the question vs linked retrieval."""
    from stageflow.apps.multihop import corpus_path
    from stageflow.retrieval import BM25Retriever, LinkedRetriever

    bm25 = BM25Retriever(corpus_path())
    rows = []
    variants: list[tuple[str, Any]] = [(f"BM25, k={k}", lambda q, k=k: bm25.search(q, k)) for k in (3, 4, 5)]
    linked = {k: LinkedRetriever(bm25, k=k) for k in (1, 2, 3)}
    variants += [(f"linked, k={k}", lambda q, r=r: r.search(q)) for k, r in linked.items()]
    for label, search in variants:
        found, shares, passages = 0, 0.0, 0
        for ex in questions:
            got = {str(hit["id"]) for hit in search(ex.question)}
            share = sum(s in got for s in ex.supporting_ids) / len(ex.supporting_ids)
            shares, found, passages = shares + share, found + (share == 1.0), passages + len(got)
        n = len(questions)
        rows.append(f"| {label} | {shares / n:.2f} ({found}/{n}) | {passages / n:.1f} |")
    return rows


def run_once(name: str, lm: Any, dev: list[Any], demos: int | None) -> tuple[EvalReport, float]:
    program = build_architecture(name, demos=demos)
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
    parser.add_argument("--dev", type=int, default=0, help="limit the question set (0: all of it)")
    parser.add_argument(
        "--set",
        choices=("dev", "train"),
        default="dev",
        help="question set: the 30 dev questions, or the 40 train ones (held out for the linked "
        "architectures, which use no demos; decompose shows the first 4 as demos)",
    )
    parser.add_argument(
        "--demos", type=int, default=None, help="train demos per predictor (default: each architecture's)"
    )
    parser.add_argument("--json", help="also write per-question results here")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(ARCHITECTURES)
    dev = (load_devset() if args.set == "dev" else load_trainset())[: args.dev or None]
    lm = make_local_lm(cache=False)
    load_s = lm.engine.load()
    reports: dict[str, EvalReport] = {}
    seconds: dict[str, list[float]] = {n: [] for n in names}
    loads: dict[str, list[float]] = {n: [] for n in names}
    started = time.perf_counter()
    for rep in range(args.repeat):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            report, load = run_once(name, lm, dev, args.demos)
            previous = reports.setdefault(name, report)
            if [r.answer for r in previous.results] != [r.answer for r in report.results]:
                print(f"WARNING: {name} answered differently in repetition {rep + 1}", file=sys.stderr)
            seconds[name].append(report.mean_seconds)
            loads[name].append(load)
    total = time.perf_counter() - started

    engine = lm.engine
    print(
        f"# Multi-hop architectures: {engine.model_path.name}, n_threads={engine.n_threads}, "
        f"{args.set} set of {len(dev)} questions\n"
    )
    print(
        f"LM cache off, prefix cache on; model load {load_s:.2f} s; {args.repeat} repetition(s), "
        f"total {total / 60:.1f} min; cores {os.cpu_count()}"
        + ("" if args.demos is None else f"; {args.demos} train demos per predictor")
        + ".\n"
    )
    print(
        "| architecture | exact | exact or contains | recall (all found) | LM calls/q | s/question "
        "median (range) | load avg |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in names:
        print(_row(name, reports[name], seconds[name], loads[name]))
    print("\nRetrieval alone (no model): recall (questions with every supporting passage), passages read\n")
    print("| retrieval | recall (all found) | passages/question |")
    print("|---|---|---|")
    print("\n".join(retrieval_table(dev)))
    if args.json:
        out = {name: [asdict(r) for r in reports[name].results] for name in names}
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    dspy.disable_logging() if hasattr(dspy, "disable_logging") else None
    main()
