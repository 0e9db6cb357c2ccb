"""The output file, written from the journal in one piece and renamed into place.

Rows are copied as the JSON text the journal holds (no re-encoding), so writing 10,000 rows
costs milliseconds. A reader never sees a half-written file: either the previous file or the new
complete one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from stageflow.runtime.journal import Journal

__all__ = ["write_output"]


def write_output(journal: Journal, path: str | os.PathLike[str]) -> int:
    """Write every planned record's row to ``path`` (JSON Lines, input order); returns the count.

    A row is ``{"id": ..., "status": "ok", "outputs": {...}}`` or
    ``{"id": ..., "status": "error", "error": {"type", "message", "stage_path", "code", "cause"}}``.
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            write = fh.write
            for id_json, status, outputs, error in journal.rows():
                if status == "done":
                    write(f'{{"id":{id_json},"status":"ok","outputs":{outputs or "{}"}}}\n')
                elif status == "failed":
                    write(f'{{"id":{id_json},"status":"error","error":{error or "null"}}}\n')
                else:  # a caller bug: only complete batches are written
                    raise RuntimeError(f"record {id_json} is {status}; the batch is not complete")
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable where the OS allows it
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return count
