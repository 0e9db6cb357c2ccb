"""What a batch run reports: counts, time, usage, and the rows, read back from the journal."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from stageflow.runtime.outcome import Usage

__all__ = ["BatchInterrupted", "BatchRow", "BatchSummary"]


class BatchRow(NamedTuple):
    """One record's result, as written to the output file.

    Attributes:
        id: The record id (its ``id`` field, or its line number).
        ok: ``False`` for a failed record.
        outputs: The fields the pipeline wrote (``None`` when it failed).
        error: ``{"type", "message", "stage_path", "code", "cause"}`` when it failed.
    """

    id: Any
    ok: bool
    outputs: dict[str, Any] | None
    error: dict[str, Any] | None


@dataclass
class BatchSummary:
    """The result of :func:`stageflow.run_batch`.

    Attributes:
        total: Records in the input.
        succeeded: Records with outputs (this run and earlier ones).
        failed: Records whose error is kept (this run and earlier ones).
        remaining: Records not finished (after an interruption).
        ran: Records run in this run.
        skipped: Records finished by earlier runs and not run again.
        repeated: Records this run ran again because an earlier run was stopped while they were
            in flight (their earlier work was lost).
        repeated_total: The same, over every run of this journal.
        retried: Failed records run again (``retry_failed=True``).
        wall_time: Seconds this run took.
        setup_time: Of which before the first record could start (reading and checking the input,
            planning, starting Ray actors).
        usage: LM calls, tokens, cost and cache hits of this run.
        interrupted: The run was stopped (Ctrl-C) before finishing.
        backend: ``"local"`` or ``"ray"``.
        journal: The journal file.
        output: The output file, when one was written.
    """

    total: int = 0
    succeeded: int = 0
    failed: int = 0
    remaining: int = 0
    ran: int = 0
    skipped: int = 0
    repeated: int = 0
    repeated_total: int = 0
    retried: int = 0
    wall_time: float = 0.0
    setup_time: float = 0.0
    usage: Usage = field(default_factory=Usage)
    interrupted: bool = False
    backend: str = "local"
    journal: Path | None = None
    output: Path | None = None
    _keep: Any = field(default=None, repr=False)  # a temporary journal's directory, removed with this

    @property
    def ok(self) -> bool:
        """Every record finished and none failed."""
        return self.failed == 0 and self.remaining == 0 and not self.interrupted

    def rows(self) -> Iterator[BatchRow]:
        """Every record's result in input order (read from the journal, not held in memory)."""
        if self.journal is None:
            return
        con = sqlite3.connect(f"{self.journal.resolve().as_uri()}?mode=ro", uri=True)
        try:
            cur = con.execute(
                "SELECT id_json, status, outputs, error FROM records WHERE seq IS NOT NULL ORDER BY seq"
            )
            for id_json, status, outputs, error in cur:
                if status not in ("done", "failed"):
                    continue
                yield BatchRow(
                    json.loads(id_json),
                    status == "done",
                    None if outputs is None else json.loads(outputs),
                    None if error is None else json.loads(error),
                )
        finally:
            con.close()

    def table(self) -> str:
        """A readable summary table (what the ``stageflow batch`` command prints)."""
        u = self.usage
        rate = f" ({self.ran / self.wall_time:,.1f} records/s)" if self.wall_time > 0 and self.ran else ""
        tokens = u.input_tokens + u.output_tokens
        rows = [
            ("records", f"{self.total:,}"),
            ("succeeded", f"{self.succeeded:,}"),
            ("failed", f"{self.failed:,}"),
        ]
        if self.remaining:
            rows.append(("not finished", f"{self.remaining:,}"))
        rows += [
            (
                "ran this run",
                f"{self.ran:,}" + (f" ({self.retried:,} failed ones retried)" if self.retried else ""),
            ),
            ("finished earlier", f"{self.skipped:,} (not run again)"),
            (
                "repeated work",
                f"{self.repeated:,} record(s) in flight at an earlier stop, run again"
                + (
                    f" ({self.repeated_total:,} over all runs)"
                    if self.repeated_total != self.repeated
                    else ""
                ),
            ),
            ("wall time", f"{self.wall_time:,.2f} s{rate}, of which setup {self.setup_time:,.2f} s"),
            ("LM calls", f"{u.lm_calls:,}"),
            ("tokens", f"{tokens:,} ({u.input_tokens:,} in, {u.output_tokens:,} out)"),
            ("cost", "unknown (no model reported one)" if u.cost is None else f"${u.cost:,.4f}"),
            ("cache hits", f"{u.cache_hits:,} stage outputs, {u.lm_cache_hits:,} LM answers"),
        ]
        width = max(len(k) for k, _ in rows)
        head = f"batch summary ({self.backend})" + (" — interrupted" if self.interrupted else "")
        return "\n".join([head, *(f"  {k:<{width}}  {v}" for k, v in rows)])


class BatchInterrupted(KeyboardInterrupt):
    """A batch run stopped by Ctrl-C after a clean stop; ``summary`` tells what was finished.

    Finished records are in the journal: running the same batch again resumes.
    """

    def __init__(self, summary: BatchSummary) -> None:
        super().__init__(
            f"batch interrupted: {summary.remaining:,} of {summary.total:,} records not finished; "
            "run the same batch again to resume"
        )
        self.summary = summary
