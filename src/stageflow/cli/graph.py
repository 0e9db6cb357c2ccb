"""``stageflow graph``: draw a pipeline file as Mermaid, Graphviz DOT or SVG (offline)."""

from __future__ import annotations

import argparse
from typing import Any

from stageflow.cli._common import EXIT_OK, add_allow_options, check_output, write_atomic

__all__ = ["NAME", "add_parser", "run"]

NAME = "graph"


def add_parser(sub: Any, common: argparse.ArgumentParser, model: argparse.ArgumentParser) -> None:
    graph = sub.add_parser(
        NAME,
        parents=[common],
        help="draw a pipeline file (Mermaid, Graphviz DOT or SVG)",
        description="Load a pipeline file and print its structure: stages, branches exactly as declared, "
        "loops with their limit, parallel groups, ForEach and ensembles, nested to any depth. "
        "Mermaid and DOT are text; SVG is drawn by Graphviz's 'dot' program, on this machine.",
    )
    graph.add_argument("file", help="the pipeline file (.yaml, .yml or .json)")
    graph.add_argument(
        "--format",
        choices=("mermaid", "dot", "svg"),
        default="mermaid",
        help="output format (default: mermaid)",
    )
    graph.add_argument("-o", "--output", metavar="OUT", help="write to OUT instead of standard output")
    add_allow_options(graph)


def run(args: argparse.Namespace) -> int:
    check_output(args.output, "-o")
    from stageflow.observe.graph import render_svg, to_dot, to_mermaid
    from stageflow.spec import load_pipeline

    pipeline = load_pipeline(args.file, allow_modules=args.allow_module)
    render = {"mermaid": to_mermaid, "dot": to_dot, "svg": render_svg}[args.format]
    text = render(pipeline)
    text = text if text.endswith("\n") else text + "\n"
    if args.output:
        write_atomic(args.output, text)
    else:
        print(text, end="")
    return EXIT_OK
