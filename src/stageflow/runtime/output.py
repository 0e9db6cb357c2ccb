"""The output file, written from the journal in one piece (:func:`stageflow.outfile.open_output`).

Rows are copied as the JSON text the journal holds (no re-encoding), so writing 10,000 rows
costs milliseconds. A reader never sees a half-written file: either the previous file or the new
complete one (a device or FIFO is written in place; ``-`` is standard output).
"""

from __future__ import annotations

import os

from stageflow.outfile import open_output
from stageflow.runtime.journal import Journal

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
                write(f'{{"id":{id_json},"status":"ok","outputs":{outputs or "{}"}}}\n')
            elif status == "failed":
                write(f'{{"id":{id_json},"status":"error","error":{error or "null"}}}\n')
            else:  # a caller bug: only complete batches are written
                raise RuntimeError(f"record {id_json} is {status}; the batch is not complete")
            count += 1
    return count
