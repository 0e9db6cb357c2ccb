"""The ``stageflow`` command line.

Each subcommand is a module of this package with ``NAME``, ``add_parser(sub, common, model)`` and
``run(args) -> int``, listed in :data:`COMMANDS`. ``stageflow --help`` and ``--version`` never
import DSPy or llama.cpp; each subcommand imports what it needs when it runs.

Exit codes: 0 success, 2 usage or validation error (bad arguments, pipeline file, input, model
file or corpus; a contract that does not hold; a missing package), 1 a run that failed (a stage that
calls ``sys.exit`` included), 130 interrupted (Ctrl-C).
Errors are one paragraph on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import os
import sys
import threading
from collections.abc import Sequence
from types import ModuleType

from stageflow._version import __version__
from stageflow.cli._common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, model_options, report_error

__all__ = ["COMMANDS", "entry", "main"]

#: The subcommand modules, in the order ``--help`` lists them.
COMMANDS: tuple[str, ...] = ("demo", "run", "validate", "graph", "report", "batch")


def _modules() -> list[ModuleType]:
    return [importlib.import_module(f"stageflow.cli.{name}") for name in COMMANDS]


def _parser(modules: list[ModuleType]) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
    )
    parser = argparse.ArgumentParser(
        prog="stageflow", description="Multi-stage language-model programs on DSPy.", parents=[common]
    )
    parser.add_argument("--version", action="version", version=f"stageflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    model = model_options()
    for module in modules:
        module.add_parser(sub, common, model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stageflow`` command; returns the exit code."""
    modules = _modules()
    parser = _parser(modules)
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) and usage errors (2, message already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    command = next(m for m in modules if args.command == m.NAME)
    try:
        return int(command.run(args))
    except KeyboardInterrupt:
        print(f"stageflow {args.command}: interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as exc:  # a stage called sys.exit(): the run did not finish, whatever the code
        stopped = RuntimeError(f"a stage called sys.exit({exc.code!r}); the run did not finish")
        return report_error(stopped, args.command, getattr(args, "debug", False))
    except BrokenPipeError:  # e.g. `stageflow demo | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        return report_error(exc, args.command, getattr(args, "debug", False))


def _busy_threads() -> list[threading.Thread]:
    """The threads Python would wait for at exit: non-daemon threads (stageflow's shared pool's
    workers among them), and the workers of every ``ThreadPoolExecutor`` (its exit hook joins them
    even when they are daemon threads, as they are when a daemon thread started the pool)."""
    pools = sys.modules.get("concurrent.futures.thread")
    pooled = set(getattr(pools, "_threads_queues", {}) or ())
    return [
        t
        for t in threading.enumerate()
        if t is not threading.main_thread() and t.is_alive() and (not t.daemon or t in pooled)
    ]


def entry() -> None:
    """The console script: :func:`main`, then exit with its code.

    After Ctrl-C, stage calls still running on worker threads cannot be stopped, and Python would
    wait for them before exiting (a stage sleeping 30 s kept the process alive 30 s). The exit
    handlers (pending cache writes, journals) run, then the process ends at once.
    """
    code = main()
    if code == EXIT_INTERRUPTED and _busy_threads():
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        os._exit(code)
    sys.exit(code)
