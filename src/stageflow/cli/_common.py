"""What the ``stageflow`` subcommands share: exit codes, options, the progress line, error reports.

Nothing here imports DSPy or llama.cpp at import time: ``stageflow --help`` stays cheap.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from stageflow.errors import ConfigurationError, ContractError, StageflowError

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_RUN_FAILED",
    "EXIT_USAGE",
    "Progress",
    "add_allow_options",
    "add_prompt_option",
    "model_options",
    "read_inputs",
    "report_error",
    "resolve_cli_lm",
    "write_atomic",
]

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def model_options() -> argparse.ArgumentParser:
    """A parent parser with ``--lm``, ``--api-base`` and ``--no-cache``."""
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
    return model


def add_prompt_option(p: argparse.ArgumentParser) -> None:
    """``--prompt auto|compact|standard``."""
    p.add_argument(
        "--prompt",
        choices=("auto", "compact", "standard"),
        default="auto",
        help="prompt style: compact (a terse JSON prompt for tiny models) or standard (DSPy's JSON "
        "adapter); auto: compact for the in-process model, standard otherwise",
    )


def add_allow_options(p: argparse.ArgumentParser) -> None:
    """``--allow-module`` (repeatable)."""
    p.add_argument(
        "--allow-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="let the file load components from this module or package (repeatable)",
    )


class Progress:
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

    def __enter__(self) -> Progress:
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


def resolve_cli_lm(args: argparse.Namespace) -> tuple[Any, str, bool]:
    """The LM named by --lm/--api-base/$STAGEFLOW_LM, warmed up; returns ``(lm, label, in_process)``."""
    from stageflow.lm import resolve_lm
    from stageflow.lm.engine import LlamaCppEngine

    lm = resolve_lm(args.lm, api_base=args.api_base, **({"cache": False} if args.no_cache else {}))
    engine = getattr(lm, "engine", None)
    if isinstance(engine, LlamaCppEngine):
        engine.load()  # a corrupt or unsupported model file fails here, with a clear message
        return lm, f"{engine.model_path.name} (in-process llama.cpp)", True
    return lm, str(getattr(lm, "model", lm)), False


def write_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent or Path("."), prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The input fields given with ``--input JSON`` or ``--input-file FILE`` (``-``: stdin)."""
    source = "--input"
    text = args.input
    if args.input_file is not None:
        source = f"--input-file {args.input_file}"
        try:
            if args.input_file == "-":
                text = sys.stdin.read()
            else:
                text = Path(args.input_file).read_bytes().decode("utf-8")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the input file {args.input_file}: {exc.strerror or exc}.", code="bad_input"
            ) from exc
        except UnicodeDecodeError as exc:
            raise ConfigurationError(
                f"{source} is not UTF-8 text (byte {exc.start}).", code="bad_input"
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


def report_error(exc: BaseException, command: str, debug: bool) -> int:
    """Print one readable paragraph about ``exc`` on stderr; return the exit code (2 usage, 1 run)."""
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
