"""``stageflow batch``: run a pipeline file over a dataset, resumably (see ``stageflow.run_batch``)."""

from __future__ import annotations

import argparse
import functools
import re
import shlex
import sys
from pathlib import Path
from typing import Any

from stageflow.cli._common import (
    EXIT_BACKEND,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_RUN_FAILED,
    add_allow_options,
    add_prompt_option,
    check_output,
    resolve_cli_lm,
)
from stageflow.errors import ConfigurationError, ContractError

__all__ = ["NAME", "add_parser", "run"]

NAME = "batch"


def add_parser(sub: Any, common: argparse.ArgumentParser, model: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        NAME,
        parents=[common, model],
        help="run a pipeline file over a dataset (resumable)",
        description="Run the pipeline on every record of a JSON Lines or CSV file and write one JSON line "
        "per record (in input order) to -o. Progress is journaled: after a crash, a kill or Ctrl-C, "
        "run the same command again to finish the remaining records; finished ones are not run again. "
        "Exit codes: 0 every record succeeded, 1 some records failed (error rows in the output), "
        "2 bad input, 3 the backend failed (worker processes kept dying), 130 interrupted.",
    )
    p.add_argument("file", help="the pipeline file (.yaml, .yml, .json) or a saved program directory")
    p.add_argument(
        "data",
        help="the records: .jsonl/.ndjson or .csv; a record's 'id' field (else its line number) is its key",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="where to write the results (JSON Lines; -: standard output, with --journal)",
    )
    p.add_argument("--journal", metavar="FILE", help="the journal (SQLite; default: OUTPUT.journal)")
    p.add_argument("--concurrency", type=int, default=16, metavar="N", help="records in flight at once (16)")
    p.add_argument(
        "--max-concurrency",
        type=int,
        metavar="N",
        help="cap on concurrent model/stage calls across all records and their fan-outs",
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue the journal's earlier run (default); --no-resume starts over",
    )
    p.add_argument("--retry-failed", action="store_true", help="run records that failed before again")
    p.add_argument(
        "--allow-changed",
        action="store_true",
        help="resume even though the pipeline or the data changed (recorded in the journal)",
    )
    p.add_argument(
        "--id-field",
        metavar="NAME",
        help="the field holding a record's id; once named it must exist (default: id where present, "
        "else the line number)",
    )
    p.add_argument("--format", choices=("jsonl", "csv"), help="the data format (default: from the extension)")
    p.add_argument(
        "--backend",
        choices=("local", "processes", "ray"),
        default="local",
        help="where records run: threads of this process (local), worker processes on this machine "
        "(processes), a Ray cluster (ray)",
    )
    p.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="worker processes of --backend processes (default: the CPUs)",
    )
    p.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (default: start a local one)")
    p.add_argument("--actors", type=int, metavar="N", help="Ray actors (default: the cluster's CPUs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    add_prompt_option(p)
    add_allow_options(p)


def _positive(args: argparse.Namespace, name: str) -> None:
    value = getattr(args, name)
    if value is not None and value < 1:
        raise ConfigurationError(
            f"--{name.replace('_', '-')} must be at least 1, got {value}.", field=name, code="bad_option"
        )


def _needs_lm(program: Any) -> bool:
    """Whether some predictor has no LM of its own (then the --lm model is needed)."""
    named = program.named_predictors() if hasattr(program, "named_predictors") else []
    return any(getattr(p, "lm", None) is None for _, p in named)


def _is_local(spec: str | None) -> bool:
    import os

    from stageflow.lm.select import LM_ENV, LOCAL_SPEC

    spec = (spec or os.environ.get(LM_ENV, "").strip() or LOCAL_SPEC).strip()
    return spec == LOCAL_SPEC or spec.startswith(LOCAL_SPEC + ":")


def _model(args: argparse.Namespace, program: Any) -> tuple[Any, Any]:
    """``(lm, adapter)`` for the run: objects for a local run, picklable factories for Ray."""
    if not _needs_lm(program):
        return None, None
    from stageflow.apps.multihop.adapter import make_adapter

    if args.backend == "ray":
        from stageflow.lm import resolve_lm

        local = _is_local(args.lm)
        kwargs = {"cache": False} if args.no_cache else {}
        lm: Any = functools.partial(resolve_lm, args.lm, api_base=args.api_base, **kwargs)
    else:
        lm, _, local = resolve_cli_lm(args)
    adapter = None
    if local or args.prompt != "auto":
        adapter = functools.partial(
            make_adapter, args.prompt == "compact" or (args.prompt == "auto" and local)
        )
    return lm, adapter


def _command(args: argparse.Namespace, journal: Path, *, retry_failed: bool = False) -> str:
    """The command that resumes this batch (the journal named explicitly; never ``--no-resume``)."""
    parts = ["stageflow", NAME, args.file, args.data, "-o", args.output, "--journal", str(journal)]
    options: list[tuple[str, Any, Any]] = [
        ("--concurrency", args.concurrency, 16),
        ("--max-concurrency", args.max_concurrency, None),
        ("--id-field", args.id_field, None),
        ("--format", args.format, None),
        ("--backend", args.backend, "local"),
        ("--processes", args.processes, None),
        ("--ray-address", args.ray_address, None),
        ("--actors", args.actors, None),
        ("--lm", args.lm, None),
        ("--api-base", args.api_base, None),
        ("--prompt", args.prompt, "auto"),
    ]
    for flag, value, default in options:
        if value != default:
            parts += [flag, str(value)]
    for module in args.allow_module:
        parts += ["--allow-module", module]
    for flag, on in (
        ("--no-cache", args.no_cache),
        ("--allow-changed", args.allow_changed),
        ("--retry-failed", args.retry_failed or retry_failed),
        ("--quiet", args.quiet),
    ):
        if on:
            parts.append(flag)
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    for name in ("concurrency", "max_concurrency", "actors", "processes"):
        _positive(args, name)
    if args.backend != "processes" and args.processes:
        raise ConfigurationError(
            "--processes applies to the process backend only.",
            code="bad_option",
            hint="add --backend processes",
        )
    if args.backend != "ray" and (args.ray_address or args.actors):
        raise ConfigurationError(
            "--ray-address and --actors apply to the Ray backend only.",
            code="bad_option",
            hint="add --backend ray",
        )
    out = Path(args.output)
    check_output(out, "-o")
    if args.journal is None and args.output == "-":
        raise ConfigurationError(
            "-o - writes the results to standard output, so there is no output file to keep the journal "
            "next to.",
            code="bad_option",
            hint="name the journal: --journal batch.journal",
        )
    journal = Path(args.journal) if args.journal else out.with_name(out.name + ".journal")
    check_output(journal, "--journal" if args.journal else "the journal (OUTPUT.journal)")
    from stageflow.runtime.batch import run_batch
    from stageflow.runtime.program import load_program
    from stageflow.runtime.runner import BackendError
    from stageflow.runtime.summary import BatchInterrupted

    program = load_program(args.file, args.allow_module)
    lm, adapter = _model(args, program)
    backend: Any = "local"
    if args.backend == "ray":
        from stageflow.runtime.ray_backend import RayBackend

        backend = RayBackend(address=args.ray_address, actors=args.actors)
    elif args.backend == "processes":
        from stageflow.runtime.process_backend import ProcessBackend

        backend = ProcessBackend(processes=args.processes)
    show = not args.quiet
    try:
        summary = run_batch(
            args.file if args.backend == "ray" else program,
            args.data,
            output=out,
            journal=journal,
            concurrency=args.concurrency,
            resume=args.resume,
            retry_failed=args.retry_failed,
            allow_changed=args.allow_changed,
            progress=show,
            backend=backend,
            lm=lm,
            adapter=adapter,
            max_concurrency=args.max_concurrency,
            id_field=args.id_field,
            allow_modules=args.allow_module,
            fmt=args.format,
            command=_command(args, journal),
        )
    except ContractError as exc:
        raise _in_file_terms(exc, args.data, Path(args.file).suffix.lower() in _FILE_SUFFIXES) from exc
    except BackendError as exc:
        if show and exc.summary is not None:
            print(exc.summary.table(), file=sys.stderr)
        print(
            f"stageflow batch: {exc.message}\n"
            + (f"  hint: {exc.hint}\n" if exc.hint else "")
            + f"The finished records are kept in {journal}. To resume, run:\n  {_command(args, journal)}",
            file=sys.stderr,
        )
        return EXIT_BACKEND
    except BatchInterrupted as stop:
        if show:
            print(stop.summary.table(), file=sys.stderr)
        print(
            f"stageflow batch: interrupted; {stop.summary.remaining:,} of {stop.summary.total:,} records are "
            f"not finished (the finished ones are kept in {journal}). To resume, run:\n"
            f"  {_command(args, journal)}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if show:
        print(summary.table(), file=sys.stderr)
    if summary.failed:
        print(
            f"stageflow batch: {summary.failed:,} of {summary.total:,} records failed; their errors are the "
            f'"status": "error" rows of {out}. Run them again with:\n'
            f"  {_command(args, journal, retry_failed=True)}",
            file=sys.stderr,
        )
        return EXIT_RUN_FAILED
    noun = "result" if summary.total == 1 else "results"
    print(f"stageflow batch: wrote {summary.total:,} {noun} to {out}.", file=sys.stderr)
    return EXIT_OK


_PASS = re.compile(r"pass (\w+)=\.\.\. when calling the pipeline")


_FILE_SUFFIXES = frozenset({".yaml", ".yml", ".json"})


def _in_file_terms(exc: ContractError, data: str, pipeline_file: bool) -> ContractError:
    """A contract error of a batch, with fixes written for records and pipeline files, not Python."""
    from stageflow.spec._hints import file_hint

    def fix(text: str | None) -> str | None:
        if not text:
            return text
        text = _PASS.sub(lambda m: f"give every record of {data} a '{m.group(1)}' field", text)
        return file_hint(text) if pipeline_file else text

    err = ContractError(
        fix(exc.message) or exc.message,
        stage_path=exc.stage_path,
        field=exc.field,
        code=exc.code,
        hint=fix(exc.hint),
    )
    err.path_is_full = True
    return err
