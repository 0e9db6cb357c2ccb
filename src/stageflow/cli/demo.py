"""``stageflow demo``: answer a question with the built-in multi-hop QA program."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from stageflow.cli._common import (
    EXIT_OK,
    Progress,
    add_prompt_option,
    check_requirements,
    check_text,
    resolve_cli_lm,
)
from stageflow.errors import ConfigurationError

__all__ = ["NAME", "add_parser", "run"]

NAME = "demo"


def add_parser(sub: Any, common: argparse.ArgumentParser, model: argparse.ArgumentParser) -> None:
    demo = sub.add_parser(
        NAME,
        parents=[common, model],
        help="answer a question with the built-in multi-hop QA program",
        description="Decompose the question, retrieve and extract a fact per sub-question, synthesize "
        "the answer; print each step and a per-stage time table. Runs on the embedded local model "
        "unless --lm says otherwise (no API key needed).",
    )
    demo.add_argument("question", nargs="?", help="the question (default: one from the shipped dev set)")
    demo.add_argument("--json", action="store_true", help="print a machine-readable result")
    demo.add_argument(
        "--fake", action="store_true", help="use a deterministic fake LM (no model needed; standard prompts)"
    )
    add_prompt_option(demo)
    demo.add_argument("--corpus", metavar="FILE", help="retrieve from this JSON Lines corpus instead")
    demo.add_argument("-k", type=int, default=3, help="passages per sub-question (default 3)")
    demo.add_argument(
        "--demos",
        type=int,
        metavar="N",
        help="labeled train-set examples shown to each predictor (default: 4 with compact prompts, "
        "0 with standard ones)",
    )


def run(args: argparse.Namespace) -> int:
    check_requirements(NAME, None if args.fake else args, retrieval=True)
    from stageflow.apps.multihop.demo import DEFAULT_DEMOS, default_question, fake_lm, format_text, run_demo
    from stageflow.apps.multihop.program import stage_name

    question = args.question if args.question is not None else default_question()
    check_text(question, "the question")
    if not question.strip():
        raise ConfigurationError("the question is empty.", code="bad_input", hint='stageflow demo "Who ...?"')
    if args.k < 1:
        raise ConfigurationError(f"-k must be at least 1, got {args.k}.", code="bad_input")
    if args.demos is not None and args.demos < 0:
        raise ConfigurationError(f"--demos must be 0 or more, got {args.demos}.", code="bad_input")
    if args.fake:
        lm, label, compact = fake_lm(), "a deterministic fake LM (no model)", False
    else:
        lm, label, local = resolve_cli_lm(args)
        compact = args.prompt == "compact" or (args.prompt == "auto" and local)
    demos = args.demos if args.demos is not None else (DEFAULT_DEMOS if compact else 0)
    with Progress(sys.stderr, lambda p: stage_name(p).strip(), enabled=not args.json):
        result = run_demo(
            question, lm=lm, compact=compact, corpus=args.corpus, k=args.k, demos=demos, model_label=label
        )
    print(json.dumps(result.to_json(), indent=2, ensure_ascii=False) if args.json else format_text(result))
    return EXIT_OK
