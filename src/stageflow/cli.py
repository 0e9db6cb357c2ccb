"""The ``stageflow`` command line.

``stageflow --help`` and ``--version`` never import DSPy; subcommands import what they need.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from stageflow._version import __version__

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stageflow",
        description="Multi-stage language-model programs on DSPy.",
    )
    parser.add_argument("--version", action="version", version=f"stageflow {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="run the built-in example pipeline",
        description="Run the built-in example: a branching, iterative pipeline. Until the embedded "
        "local model lands, it runs on stageflow's deterministic fake LM (no model, no API key).",
    )
    demo.add_argument("question", nargs="?", default="What is 12 times 7?", help="the question to answer")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``stageflow`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from stageflow.examples.quickstart import run_demo

        return run_demo(args.question)
    parser.print_help()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
