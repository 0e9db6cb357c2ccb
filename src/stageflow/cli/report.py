"""``stageflow report``: the self-contained HTML run report of a saved trace."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from stageflow.cli._common import EXIT_OK, check_output
from stageflow.errors import ConfigurationError

__all__ = ["NAME", "add_parser", "run"]

NAME = "report"


def add_parser(sub: Any, common: argparse.ArgumentParser, model: argparse.ArgumentParser) -> None:
    report = sub.add_parser(
        NAME,
        parents=[common],
        help="write the HTML report of a saved trace",
        description="Read a trace written by stageflow.Tracer.save() and write one self-contained HTML "
        "file (no network requests): the pipeline graph, a per-stage table, a timeline of every span, "
        "and each span's inputs and outputs on a click.",
    )
    report.add_argument("trace", help="the trace JSON file")
    report.add_argument(
        "-o", "--output", metavar="OUT", help="the HTML file to write (default: TRACE with .html)"
    )
    report.add_argument("--title", help="the page title (default: names the traced pipelines)")


def run(args: argparse.Namespace) -> int:
    from stageflow.observe.report import write_report

    out = Path(args.output) if args.output else Path(args.trace).with_suffix(".html")
    if out.resolve() == Path(args.trace).resolve():
        raise ConfigurationError(
            f"The report would overwrite the trace {args.trace}.",
            code="bad_output",
            hint="name another file with -o report.html",
        )
    check_output(out, "-o" if args.output else "the report (TRACE with .html)")
    target = write_report(Path(args.trace), out, title=args.title)
    size = target.stat().st_size
    print(f"wrote {target} ({size / 1024:.0f} KB)", file=sys.stderr)
    return EXIT_OK
