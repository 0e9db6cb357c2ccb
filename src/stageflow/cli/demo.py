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
        description="Answer a multi-hop question over the shipped corpus and print each step and a "
        "per-stage time table. The default architecture finds the passages without a model "
        "(BM25 + entity links), lists typed candidate answers and lets the model pick one. Runs on "
        "the embedded local model unless --lm says otherwise (no API key needed).",
    )
    demo.add_argument("question", nargs="?", help="the question (default: one from the shipped dev set)")
    demo.add_argument("--json", action="store_true", help="print a machine-readable result")
    demo.add_argument(
        "--fake", action="store_true", help="use a deterministic fake LM (no model needed; standard prompts)"
    )
    add_prompt_option(demo)
    demo.add_argument(
        "--architecture",
        "-a",
        default=None,
        metavar="NAME",
        help="linked-choose (default), linked-likelihood, linked-read, linked-first (no model) or "
        "decompose; see benchmarks/architectures.py for how they compare",
    )
    demo.add_argument("--corpus", metavar="FILE", help="retrieve from this JSON Lines corpus instead")
    demo.add_argument(
        "-k", type=int, default=None, help="passages per search (default: 2 hop-1 passages; 3 for decompose)"
    )
    demo.add_argument(
        "--demos",
        type=int,
        metavar="N",
        help="labeled train-set examples shown to each predictor (default: the architecture's with "
        "compact prompts: 4 for decompose, 0 otherwise; 0 with standard prompts)",
    )


def run(args: argparse.Namespace) -> int:
    from stageflow.apps.multihop.architectures import DEFAULT_ARCHITECTURE, get_architecture

    architecture = get_architecture(args.architecture or DEFAULT_ARCHITECTURE).name
    uses_model = get_architecture(architecture).uses_lm and not args.fake
    check_requirements(NAME, args if uses_model else None, retrieval=True)
    from stageflow.apps.multihop.demo import default_question, demo_stage_name, fake_lm, format_text, run_demo

    question = args.question if args.question is not None else default_question()
    check_text(question, "the question")
    if not question.strip():
        raise ConfigurationError("the question is empty.", code="bad_input", hint='stageflow demo "Who ...?"')
    if args.k is not None and args.k < 1:
        raise ConfigurationError(f"-k must be at least 1, got {args.k}.", code="bad_input")
    if args.demos is not None and args.demos < 0:
        raise ConfigurationError(f"--demos must be 0 or more, got {args.demos}.", code="bad_input")
    if args.fake:
        lm, label, compact = fake_lm(), "a deterministic fake LM (no model)", False
    elif not uses_model:
        lm, label, compact = None, "no model", True
    else:
        lm, label, local = resolve_cli_lm(args)
        compact = args.prompt == "compact" or (args.prompt == "auto" and local)
    with Progress(sys.stderr, lambda p: demo_stage_name(p, architecture).strip(), enabled=not args.json):
        result = run_demo(
            question,
            lm=lm,
            compact=compact,
            architecture=architecture,
            corpus=args.corpus,
            k=args.k,
            demos=args.demos,
            model_label=label,
        )
    print(json.dumps(result.to_json(), indent=2, ensure_ascii=False) if args.json else format_text(result))
    return EXIT_OK
