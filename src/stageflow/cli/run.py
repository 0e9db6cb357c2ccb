"""``stageflow run``: run a pipeline file on one input."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from stageflow import strict_json
from stageflow.cli._common import (
    EXIT_OK,
    Progress,
    add_allow_options,
    add_prompt_option,
    check_output,
    check_requirements,
    read_inputs,
    resolve_cli_lm,
    write_atomic,
)

__all__ = ["NAME", "add_parser", "run"]

NAME = "run"


def add_parser(sub: Any, common: argparse.ArgumentParser, model: argparse.ArgumentParser) -> None:
    run_p = sub.add_parser(
        NAME,
        parents=[common, model],
        help="run a pipeline file on one input",
        description="Load a YAML/JSON pipeline file, run it on the input and print the result fields "
        "as JSON.",
    )
    run_p.add_argument("file", help="the pipeline file (.yaml, .yml or .json)")
    given = run_p.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", metavar="JSON", help='the input fields, e.g. \'{"question": "..."}\'')
    given.add_argument("--input-file", metavar="FILE", help="read the input JSON from FILE ('-': stdin)")
    run_p.add_argument(
        "-o", "--output", metavar="FILE", help="write the result JSON to FILE (only when the run succeeds)"
    )
    run_p.add_argument(
        "--profile",
        action="store_true",
        help="after the run, print a table of every stage (time, LM calls, tokens, cost, cache hits, "
        "retries, repairs, errors) with the run's critical path to stderr",
    )
    add_prompt_option(run_p)
    add_allow_options(run_p)


def run(args: argparse.Namespace) -> int:
    inputs = read_inputs(args)
    check_output(args.output)
    import dspy

    from stageflow.spec import load_pipeline, uses_retrieval

    pipeline = load_pipeline(
        args.file, allow_modules=args.allow_module, inputs=list(inputs), allow_paths=args.allow_path
    )
    needs_lm = bool(list(pipeline.named_predictors()))
    check_requirements(NAME, args if needs_lm else None, retrieval=uses_retrieval(pipeline))
    settings: dict[str, Any] = {}
    if needs_lm:
        from stageflow.apps.multihop.adapter import make_adapter

        lm, _, local = resolve_cli_lm(args)
        settings["lm"] = lm
        if local or args.prompt != "auto":
            settings["adapter"] = make_adapter(args.prompt == "compact" or (args.prompt == "auto" and local))
    from stageflow.observe.profiler import Profiler, profile

    prof = Profiler()
    observed = profile(prof) if args.profile else contextlib.nullcontext(prof)
    try:
        with (
            dspy.context(**settings),
            observed,
            Progress(sys.stderr, lambda p: p or "pipeline", enabled=True),
        ):
            result = pipeline(**inputs)
    finally:
        if args.profile:
            print(prof.table(), file=sys.stderr)  # a failed run's stages too
    text = strict_json.dumps(dict(result.items()), indent=2, ensure_ascii=False, default=str)
    if args.output:
        write_atomic(args.output, text + "\n")
    else:
        print(text)
    return EXIT_OK
