"""The ``stageflow`` command line: ``demo``, ``run`` and ``validate``.

``stageflow --help`` and ``--version`` never import DSPy or llama.cpp; each subcommand imports what
it needs. Exit codes: 0 success, 2 usage or validation error (bad arguments, pipeline file, input,
model file or corpus; a contract that does not hold), 1 a run that failed. Errors are one paragraph
on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from stageflow._version import __version__
from stageflow.errors import ConfigurationError, ContractError, StageflowError

__all__ = ["main"]

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--lm",
        metavar="MODEL",
        help="'local' (the embedded SmolLM2 model, default), 'local:/path/model.gguf', or a DSPy model "
        "string such as openai/gpt-4o-mini (keys from the usual environment variables); "
        "default: $STAGEFLOW_LM or local",
    )
    model.add_argument("--api-base", metavar="URL", help="endpoint for a served model (OpenAI-compatible)")
    model.add_argument(
        "--no-cache", action="store_true", help="do not reuse DSPy's cached model answers (fresh calls)"
    )

    parser = argparse.ArgumentParser(
        prog="stageflow", description="Multi-stage language-model programs on DSPy.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"stageflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
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
    _prompt(demo)
    demo.add_argument("--corpus", metavar="FILE", help="retrieve from this JSON Lines corpus instead")
    demo.add_argument("-k", type=int, default=3, help="passages per sub-question (default 3)")
    demo.add_argument(
        "--demos",
        type=int,
        metavar="N",
        help="labeled train-set examples shown to each predictor (default: 4 with compact prompts, "
        "0 with standard ones)",
    )

    run = sub.add_parser(
        "run",
        parents=[common, model],
        help="run a pipeline file on one input",
        description="Load a YAML/JSON pipeline file, run it on the input and print the result fields "
        "as JSON.",
    )
    run.add_argument("file", help="the pipeline file (.yaml, .yml or .json)")
    given = run.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", metavar="JSON", help='the input fields, e.g. \'{"question": "..."}\'')
    given.add_argument("--input-file", metavar="FILE", help="read the input JSON from FILE ('-': stdin)")
    run.add_argument(
        "--output", metavar="FILE", help="write the result JSON to FILE (only when the run succeeds)"
    )
    _prompt(run)
    _allow(run)

    validate = sub.add_parser(
        "validate",
        parents=[common],
        help="check a pipeline file without running it",
        description="Load the pipeline file and check every stage's inputs and outputs (no model calls).",
    )
    validate.add_argument("file", help="the pipeline file (.yaml, .yml or .json)")
    validate.add_argument(
        "--inputs", metavar="A,B", help="input field names to check for (default: the file's 'inputs')"
    )
    _allow(validate)
    return parser


def _prompt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt",
        choices=("auto", "compact", "standard"),
        default="auto",
        help="prompt style: compact (a terse JSON prompt for tiny models) or standard (DSPy's JSON "
        "adapter); auto: compact for the in-process model, standard otherwise",
    )


def _allow(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="let the file load components from this module or package (repeatable)",
    )


# -- progress line ---------------------------------------------------------------------------------


class _Progress:
    """A spinner with the running stage's name on stderr, only when stderr is a terminal."""

    def __init__(self, stream: TextIO, label: Callable[[str], str], enabled: bool) -> None:
        self.stream = stream
        self.label = label
        self.enabled = enabled and stream.isatty()
        self.current = "starting"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._hooks: Any = None
        utf = (getattr(stream, "encoding", "") or "").lower().replace("-", "") == "utf8"
        self.frames = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏" if utf else "|/-\\"

    def before_stage(self, *, path: str, **future: Any) -> None:
        self.current = self.label(path)

    def __enter__(self) -> _Progress:
        if self.enabled:
            from stageflow.engine.hooks import attach_hooks

            self._hooks = attach_hooks(self)
            self._hooks.__enter__()
            self._thread = threading.Thread(target=self._spin, name="stageflow-progress", daemon=True)
            self._thread.start()
        return self

    def _spin(self) -> None:
        started, i = time.monotonic(), 0
        while not self._stop.wait(0.1):
            frame = self.frames[i % len(self.frames)]
            text = f"{frame} {self.current} ... {time.monotonic() - started:4.1f}s"
            self.stream.write(f"\r{text[:78]:<78}")
            self.stream.flush()
            i += 1

    def __exit__(self, *exc: object) -> None:
        if not self.enabled:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._hooks.__exit__(None, None, None)
        self.stream.write("\r" + " " * 78 + "\r")
        self.stream.flush()


# -- shared helpers ---------------------------------------------------------------------------------


def _resolve_lm(args: argparse.Namespace) -> tuple[Any, str, bool]:
    """The LM named by --lm/--api-base/$STAGEFLOW_LM, warmed up; returns ``(lm, label, in_process)``."""
    from stageflow.lm import resolve_lm
    from stageflow.lm.engine import LlamaCppEngine

    lm = resolve_lm(args.lm, api_base=args.api_base, **({"cache": False} if args.no_cache else {}))
    engine = getattr(lm, "engine", None)
    if isinstance(engine, LlamaCppEngine):
        engine.load()  # a corrupt or unsupported model file fails here, with a clear message
        return lm, f"{engine.model_path.name} (in-process llama.cpp)", True
    return lm, str(getattr(lm, "model", lm)), False


def _write_atomic(path: str, text: str) -> None:
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_inputs(args: argparse.Namespace) -> dict[str, Any]:
    source = "--input"
    text = args.input
    if args.input_file is not None:
        source = f"--input-file {args.input_file}"
        try:
            text = sys.stdin.read() if args.input_file == "-" else Path(args.input_file).read_text("utf-8")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the input file {args.input_file}: {exc.strerror or exc}.", code="bad_input"
            ) from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"{source} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).",
            code="bad_input",
            hint='pass a JSON object such as \'{"question": "Who wrote Dune?"}\'',
        ) from exc
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"{source} must be a JSON object of input fields, got {type(data).__name__}.",
            code="bad_input",
            hint='pass a JSON object such as \'{"question": "Who wrote Dune?"}\'',
        )
    return data


# -- commands -------------------------------------------------------------------------------------------


def _cmd_demo(args: argparse.Namespace) -> int:
    from stageflow.apps.multihop.demo import DEFAULT_DEMOS, default_question, fake_lm, format_text, run_demo
    from stageflow.apps.multihop.program import stage_name

    question = args.question if args.question is not None else default_question()
    if not question.strip():
        raise ConfigurationError("the question is empty.", code="bad_input", hint='stageflow demo "Who ...?"')
    if args.k < 1:
        raise ConfigurationError(f"-k must be at least 1, got {args.k}.", code="bad_input")
    if args.demos is not None and args.demos < 0:
        raise ConfigurationError(f"--demos must be 0 or more, got {args.demos}.", code="bad_input")
    if args.fake:
        lm, label, compact = fake_lm(), "a deterministic fake LM (no model)", False
    else:
        lm, label, local = _resolve_lm(args)
        compact = args.prompt == "compact" or (args.prompt == "auto" and local)
    demos = args.demos if args.demos is not None else (DEFAULT_DEMOS if compact else 0)
    with _Progress(sys.stderr, lambda p: stage_name(p).strip(), enabled=not args.json):
        result = run_demo(
            question, lm=lm, compact=compact, corpus=args.corpus, k=args.k, demos=demos, model_label=label
        )
    print(json.dumps(result.to_json(), indent=2, ensure_ascii=False) if args.json else format_text(result))
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    inputs = _read_inputs(args)
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise ConfigurationError(
            f"--output {args.output}: the directory {Path(args.output).resolve().parent} does not exist.",
            code="bad_output",
        )
    import dspy

    from stageflow.spec import load_pipeline

    pipeline = load_pipeline(args.file, allow_modules=args.allow_module, inputs=list(inputs))
    settings: dict[str, Any] = {}
    if list(pipeline.named_predictors()):
        from stageflow.apps.multihop.adapter import make_adapter

        lm, _, local = _resolve_lm(args)
        settings["lm"] = lm
        if local or args.prompt != "auto":
            settings["adapter"] = make_adapter(args.prompt == "compact" or (args.prompt == "auto" and local))
    with dspy.context(**settings), _Progress(sys.stderr, lambda p: p or "pipeline", enabled=True):
        result = pipeline(**inputs)
    text = json.dumps(dict(result.items()), indent=2, ensure_ascii=False, default=str)
    if args.output:
        _write_atomic(args.output, text + "\n")
    else:
        print(text)
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    from stageflow.spec import declared_inputs, load_pipeline

    names = None if args.inputs is None else [s.strip() for s in args.inputs.split(",") if s.strip()]
    pipeline = load_pipeline(args.file, allow_modules=args.allow_module, inputs=names)
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
    return EXIT_OK


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _cmd_demo,
    "run": _cmd_run,
    "validate": _cmd_validate,
}


def _report(exc: BaseException, command: str, debug: bool) -> int:
    usage = isinstance(exc, ConfigurationError | ContractError)
    if isinstance(exc, StageflowError):
        text = exc.message.rstrip()
        if exc.hint:
            text = f"{text.rstrip('.')}. Fix: {exc.hint.rstrip('.')}."
    else:
        text = f"{type(exc).__name__}: {exc}"
    if not usage and not debug:
        text += " (run again with --debug for the traceback)"
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    kind = "invalid input" if usage else "run failed"
    paragraph = " ".join(f"stageflow {command}: {kind}: {text}".split())
    print(
        textwrap.fill(paragraph, width=100, break_long_words=False, break_on_hyphens=False), file=sys.stderr
    )
    return EXIT_USAGE if usage else EXIT_RUN_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stageflow`` command; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) and usage errors (2, message already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    try:
        return _COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"stageflow {args.command}: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `stageflow demo | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        return _report(exc, args.command, getattr(args, "debug", False))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
