"""``stageflow validate``: check a pipeline file without running it."""

from __future__ import annotations

import argparse
from typing import Any

from stageflow.cli._common import EXIT_OK, add_allow_options
from stageflow.errors import ConfigurationError

__all__ = ["NAME", "add_parser", "run"]

NAME = "validate"


def add_parser(sub: Any, common: argparse.ArgumentParser, model: argparse.ArgumentParser) -> None:
    validate = sub.add_parser(
        NAME,
        parents=[common],
        help="check a pipeline file without running it",
        description="Load the pipeline file and check every stage's inputs and outputs (no model calls).",
    )
    validate.add_argument("file", help="the pipeline file (.yaml, .yml or .json)")
    validate.add_argument(
        "--inputs", metavar="A,B", help="input field names to check for (default: the file's 'inputs')"
    )
    validate.add_argument(
        "--strict",
        action="store_true",
        help="refuse fields that only stages with undeclared outputs may produce (instead of warning)",
    )
    add_allow_options(validate)


def run(args: argparse.Namespace) -> int:
    from stageflow.spec import declared_inputs, load_pipeline
    from stageflow.spec._hints import file_hint

    names = None if args.inputs is None else [s.strip() for s in args.inputs.split(",") if s.strip()]
    pipeline = load_pipeline(
        args.file,
        allow_modules=args.allow_module,
        inputs=names,
        allow_paths=args.allow_path,
        strict=True if args.strict else None,
    )
    inputs = names if names is not None else declared_inputs(pipeline)
    if inputs is None:
        raise ConfigurationError(
            f"{args.file} declares no 'inputs', so there is nothing to check the contracts against.",
            code="no_inputs",
            hint="add 'inputs: [question]' to the file, or pass --inputs question",
        )
    fields = pipeline.check(inputs)
    predictors = [name for name, _ in pipeline.named_predictors()]
    print(f"{args.file}: valid. Inputs {inputs} give the fields {list(fields)}.")
    print(f"{len(predictors)} predictor(s): {', '.join(predictors) or 'none'}.")
    warnings = getattr(fields, "warnings", [])
    for line in warnings:
        print(f"warning: {file_hint(line)}")
    if warnings:
        print(f"{len(warnings)} field(s) are checked when the pipeline runs; --strict refuses them now.")
    return EXIT_OK
