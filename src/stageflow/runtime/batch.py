"""``stageflow.run_batch``: run a program over a dataset, resumably, exactly once per record."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stageflow._options import whole_number
from stageflow.errors import ConfigurationError, ContractError
from stageflow.runtime.fingerprint import (
    program_fingerprint,
    stage_changes,
    stage_fingerprints,
    warn_dynamic_reads,
)
from stageflow.runtime.heap import batch_heap
from stageflow.runtime.journal import Journal, JournalError, ScanResult
from stageflow.runtime.local import LocalExecutor
from stageflow.runtime.output import write_output
from stageflow.runtime.program import is_pipeline, load_program, run_settings
from stageflow.runtime.progress import ProgressBar
from stageflow.runtime.records import RecordSource, open_records
from stageflow.runtime.run_data import changed_during_last_run, run_ended, run_started
from stageflow.runtime.runner import BackendError, Counters, LoopResult, run_loop
from stageflow.runtime.summary import BatchInterrupted, BatchSummary

__all__ = ["run_batch"]


def _check_contracts(program: Any, scan: ScanResult, source: RecordSource) -> None:
    """Every distinct set of input fields satisfies the pipeline's contracts (before any LM call)."""
    if not is_pipeline(program):
        return
    for names, (line, key) in scan.field_sets.items():
        try:
            program.check(sorted(names))
        except ContractError as exc:
            if source.path is not None:
                where = f"{source.label} line {line} (record {key!r}; fields {sorted(names)})"
            else:
                where = f"record {key!r} (item {line}; fields {sorted(names)})"
            raise ContractError(
                f"{where}: {exc.message}",
                stage_path=exc.stage_path,
                field=exc.field,
                code=exc.code,
                hint=exc.hint,
            ) from exc


def _changes(
    journal: Journal,
    scan: ScanResult,
    fingerprint: str,
    stages: dict[str, str],
    source: RecordSource,
) -> list[str]:
    meta = journal.meta()
    found: list[str] = []
    planned_fp = meta.get("fingerprint") or ""
    if planned_fp != fingerprint:
        planned = journal.stage_fingerprints()
        which = stage_changes(planned, stages) if planned and stages else ""
        if not planned or not stages:  # a journal from before they were kept, or no picture
            which = (
                "the journal does not record which stage; a signature, instructions, demos, code, "
                "structure or the model differs"
            )
        elif not which:  # every stage is the same: what holds them is not
            which = "no stage by itself: the pipeline's own settings or the model it is given differ"
        during = changed_during_last_run(journal.path, planned_fp)
        if during:
            which += (
                f"; data the stages read changed during the last run ({', '.join(during)}): if it "
                "is a stage's own call log or counter, create it with stageflow.untracked([]) / ({}) so "
                "it is left out; if another thread edited a setting meanwhile, that run mixed settings"
            )
        found.append(
            f"the program changed ({which}; fingerprint {meta.get('fingerprint')} when planned, "
            f"{fingerprint} now)"
        )
    if meta.get("input_digest") != scan.digest:
        d = journal.differences()
        found.append(
            f"the input {source.label} changed ({meta.get('record_count')} records when planned, "
            f"{scan.count} now: {d['added']} added, {d['removed']} removed, {d['changed']} changed)"
        )
    return found


def _make_backend(backend: Any) -> Any:
    """``None`` for the local backend, else the backend's options object."""
    if isinstance(backend, str):
        if backend == "local":
            return None
        if backend == "processes":
            from stageflow.runtime.process_backend import ProcessBackend

            return ProcessBackend()
        if backend == "ray":
            from stageflow.runtime.ray_backend import RayBackend

            return RayBackend()
    elif type(backend).__name__ in ("RayBackend", "ProcessBackend"):
        return backend
    raise ConfigurationError(
        f"backend={backend!r} is not a batch backend. Known: 'local', 'processes', 'ray' (or a "
        "ProcessBackend(...) / RayBackend(...)).",
        field="backend",
        code="bad_option",
    )


def _backend_name(options: Any) -> str:
    return (
        "local" if options is None else "processes" if type(options).__name__ == "ProcessBackend" else "ray"
    )


def run_batch(
    pipeline: Any,
    records: Any,
    *,
    output: str | os.PathLike[str] | None = None,
    journal: str | os.PathLike[str] | None = None,
    concurrency: int = 16,
    resume: bool = True,
    retry_failed: bool = False,
    allow_changed: bool = False,
    progress: bool = True,
    backend: Any = "local",
    lm: Any = None,
    adapter: Any = None,
    max_concurrency: int | None = None,
    id_field: str | None = None,
    allow_modules: Sequence[str] = (),
    fmt: str | None = None,
    command: str | None = None,
) -> BatchSummary:
    """Run ``pipeline`` on every record of ``records``, journaled so a stopped run resumes.

    Each record's result is committed to the journal as it finishes. Running the same batch again
    after a crash, a kill or Ctrl-C skips finished records, runs the rest, and writes ``output``
    with every record exactly once, in input order (see the README's guarantee). A failing record
    never stops the others: it becomes an error row and can be run again with ``retry_failed``.

    Args:
        pipeline: A stageflow pipeline or ``dspy.Module``, or a path to a pipeline file / a saved
            program directory.
        records: A ``.jsonl``/``.csv`` file, or an iterable of dicts; a record's ``id`` field (else
            its line number) is its key, the other fields are the pipeline's inputs.
        output: Write the results here (JSON Lines) once every record has finished.
        journal: The journal file (SQLite). ``None``: a temporary one (no resume across calls).
        concurrency: Records in flight at once (local: worker threads; processes: split across the
            worker processes; Ray: actors × slots).
        resume: Continue a journal's earlier run; ``False`` starts over, discarding it.
        retry_failed: Run records that failed in earlier runs again.
        allow_changed: Resume even though the program or the input changed since the journal was
            planned (finished records are kept; changed records run again); recorded in the journal.
        progress: Show a progress bar when stderr is a terminal.
        backend: ``"local"`` (threads of this process), ``"processes"`` (worker processes on this
            machine, :class:`~stageflow.runtime.ProcessBackend`), ``"ray"`` or a
            :class:`~stageflow.runtime.RayBackend`.
        lm: The LM records run with: a ``dspy.LM``, a model string or a factory; default: the
            current DSPy settings.
        adapter: The DSPy adapter (or a factory); default: the current DSPy settings.
        max_concurrency: Cap on concurrent LM/stage calls across all records and their fan-outs
            (stageflow's budget; ``stageflow.configure(max_concurrency=...)`` applies too).
        id_field: The field holding a record's id. Named (``"id"`` included), it must exist (a
            CSV column, or a field of at least one record); default: ``id`` where present, else
            the line number.
        allow_modules: Modules a pipeline file may load components from.
        fmt: ``"jsonl"`` or ``"csv"`` to override the input file's extension.
        command: The command line to record in the journal (the CLI passes its own).

    Returns:
        A :class:`BatchSummary`; ``summary.rows()`` reads every result back.

    Examples:
        >>> import stageflow
        >>> size = stageflow.stage(lambda text: {"n": len(text)}, writes=["n"])
        >>> count = stageflow.SequentialPipeline([size])
        >>> summary = stageflow.run_batch(count, [{"id": "a", "text": "hi"}, {"id": "b", "text": "hello"}])
        >>> [(row.id, row.outputs) for row in summary.rows()], summary.ok
        ([('a', {'n': 2}), ('b', {'n': 5})], True)

    Raises:
        ConfigurationError: bad input (before any record runs).
        ContractError: the input fields do not satisfy the pipeline (before any record runs).
        JournalError: the journal belongs to a different program or input, or is in use.
        BatchInterrupted: Ctrl-C, after a clean stop (a ``KeyboardInterrupt`` with ``.summary``).
    """
    t0 = time.perf_counter()
    concurrency = whole_number(concurrency, "concurrency")
    max_concurrency = whole_number(max_concurrency, "max_concurrency", none_ok=True)
    remote = _make_backend(backend)
    name = _backend_name(remote)
    if remote is not None:
        from stageflow.runtime.process_backend import refuse_unshareable_limits

        refuse_unshareable_limits(name, forked=name == "processes" and remote.method() == "fork")
    if output is not None:
        from stageflow.outfile import check_output

        check_output(output, "the batch output")
    source = open_records(records, id_field=id_field, fmt=fmt)
    program = load_program(pipeline, allow_modules)
    settings = run_settings(lm, adapter)
    import dspy

    with dspy.context(**settings):
        fingerprint = program_fingerprint(program)
        stages = stage_fingerprints(program)
        started = run_started(program)
    warn_dynamic_reads(program)
    keep: Any = None
    if journal is None:
        keep = tempfile.TemporaryDirectory(prefix="stageflow-batch-")
        journal = Path(keep.name) / "journal.sqlite"
    summary = BatchSummary(backend=name, journal=Path(journal), _keep=keep)
    with Journal(journal) as j:
        if not resume and j.has_plan():
            j.reset()
        scan = j.scan(source)
        _check_contracts(program, scan, source)
        allowed: str | None = None
        if j.has_plan():
            changes = _changes(j, scan, fingerprint, stages, source)
            if changes and not allow_changed:
                raise JournalError(
                    f"cannot resume from the journal {j.path}: " + "; and ".join(changes) + ". Resuming "
                    "would mix results of different programs or inputs in one output.",
                    code="changed_since_planned",
                    hint="start over with --no-resume (resume=False) or another --journal; or pass "
                    "--allow-changed (allow_changed=True) to keep the finished records anyway",
                )
            if changes:
                allowed = "; ".join(changes)
                j.apply_scan(scan, fingerprint, source.identity(), stages)
        else:
            j.apply_scan(scan, fingerprint, source.identity(), stages)
        plan = j.plan(retry_failed)
        summary.skipped = plan.total - len(plan.todo)
        run_id = j.begin_run(backend=summary.backend, command=command, allowed_changes=allowed)
        executor: Any = None
        try:
            if remote is None:
                executor = LocalExecutor(program, settings, concurrency)
            elif name == "processes":
                cap = _cap(max_concurrency)
                executor = remote.executor(
                    pipeline, program, lm, adapter, allow_modules, concurrency, cap, settings
                )
            else:
                executor = remote.executor(
                    pipeline, program, lm, adapter, allow_modules, concurrency, _cap(max_concurrency)
                )
        except KeyboardInterrupt:  # Ctrl-C while the workers start: nothing ran; an interrupted run
            pass
        writer = j.writer(run_id)
        bar = ProgressBar(plan.total, summary.skipped, plan.failed if not retry_failed else 0, progress)
        limit = contextlib.nullcontext() if max_concurrency is None else _limits(max_concurrency)
        summary.setup_time = time.perf_counter() - t0
        try:
            if executor is None:
                result = LoopResult(Counters(), interrupted=True)
            else:
                with limit, batch_heap():
                    pending = j.pending_records(source, plan)
                    result = run_loop(pending, executor, writer, lambda s: plan.todo[s][0], bar.update)
        finally:
            bar.close()
            writer.close()
            if executor is not None:
                executor.close()
            with dspy.context(**settings), contextlib.suppress(Exception):  # best effort: see run_data
                run_ended(j.path, j.meta().get("fingerprint", ""), program, started)
        c = result.counters
        totals = j.totals()
        if result.fatal is None and writer.error is not None:
            result.fatal = writer.error
        state = "failed" if result.fatal else "interrupted" if result.interrupted else "finished"
        summary.total = totals["total"]
        summary.succeeded, summary.failed = totals["done"], totals["failed"]
        summary.remaining = summary.total - summary.succeeded - summary.failed
        summary.ran, summary.repeated, summary.retried = c.ran, c.repeated, c.retried
        summary.repeated_total = totals["repeated"]
        summary.usage = c.usage
        summary.interrupted = result.interrupted and summary.remaining > 0
        j.end_run(run_id, state=state, ran=c.ran, failed=c.failed, repeated=c.repeated)
        if result.fatal is not None:
            if isinstance(result.fatal, BackendError):
                summary.wall_time = time.perf_counter() - t0
                result.fatal.summary = summary
            raise result.fatal
        if output is not None and summary.remaining == 0:
            write_output(j, output)
            summary.output = Path(output)
    summary.wall_time = time.perf_counter() - t0
    if summary.interrupted:
        raise BatchInterrupted(summary)
    return summary


def _cap(max_concurrency: int | None) -> int | None:
    """The budget worker processes share: ``max_concurrency``, else the tightest budget in force here
    (``stageflow.configure`` / ``stageflow.limits``), which the worker processes cannot see."""
    if max_concurrency is not None:
        return max_concurrency
    from stageflow.engine.concurrency import leaf_slots

    return min((b.limit for b in leaf_slots()), default=None)


def _limits(n: int) -> contextlib.AbstractContextManager[Any]:
    from stageflow.engine.concurrency import limits

    return limits(max_concurrency=n)
