"""The output file, written from the journal in one piece (:func:`stageflow.outfile.open_output`).

Rows are copied as the JSON text the journal holds (no re-encoding), so writing 10,000 rows
costs milliseconds. A reader never sees a half-written file: either the previous file or the new
complete one (a device or FIFO is written in place; ``-`` is standard output).
"""

from __future__ import annotations

import os

from stageflow.outfile import open_output
from stageflow.runtime.journal import Journal, JournalError

__all__ = ["write_output"]


def write_output(journal: Journal, path: str | os.PathLike[str]) -> int:
    """Write every planned record's row to ``path`` (JSON Lines, input order); returns the count.

    A row is ``{"id": ..., "status": "ok", "outputs": {...}}`` or
    ``{"id": ..., "status": "error", "error": {"type", "message", "stage_path", "code", "cause"}}``.
    """
    count = 0
    with open_output(path, "the batch output") as fh:
        write = fh.write
        for id_json, status, outputs, error in journal.rows():
            if status == "done":
                write(f'{{"id":{id_json},"status":"ok","outputs":{_object(outputs, id_json, journal)}}}\n')
            elif status == "failed":
                write(f'{{"id":{id_json},"status":"error","error":{_object(error, id_json, journal)}}}\n')
            else:  # a caller bug: only complete batches are written
                raise RuntimeError(f"record {id_json} is {status}; the batch is not complete")
            count += 1
    return count


def _object(text: str | None, id_json: str, journal: Journal) -> str:
    """A row's JSON object text as the journal holds it; a row that cannot be one (a damaged or
    hand-edited journal) stops the output instead of being copied into it."""
    if not isinstance(text, str) or not text.startswith("{") or not text.endswith("}"):
        raise JournalError(
            f"the journal {journal.path} is damaged: the record {id_json} has {text!r:.60} where a JSON "
            "object belongs, so its output row cannot be written.",
            code="bad_journal",
            hint="run the batch again with --no-resume (the journal is rebuilt), or remove the record's row",
        )
    return text
