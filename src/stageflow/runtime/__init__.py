"""Batch runs over datasets that survive crashes: in threads, in worker processes, or on a Ray cluster.

:func:`run_batch` (``stageflow batch`` on the command line) runs a program on every record of a
JSON Lines / CSV file or a list of dicts. A SQLite journal (WAL) records every record's start and
result as it happens; the output file is written from the journal, whole, at the end.

**Guarantee: exactly-once output.** Kill the run at any instant (SIGKILL included) and run the
same command again: finished records are not run again, records that were in flight at the kill
run again (the summary counts them as repeated work), and the output holds every record id
exactly once, in input order. A journal refuses to resume with a changed program or input unless
told to (``allow_changed``).

Modules: :mod:`~stageflow.runtime.records` (input), :mod:`~stageflow.runtime.journal` and
:mod:`~stageflow.runtime.writer` (the journal), :mod:`~stageflow.runtime.runner` (the loop),
:mod:`~stageflow.runtime.outcome` (one record), :mod:`~stageflow.runtime.local`,
:mod:`~stageflow.runtime.process_backend` and :mod:`~stageflow.runtime.ray_backend` (backends),
:mod:`~stageflow.runtime.summary` and :mod:`~stageflow.runtime.progress` (reporting).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stageflow._lazy import lazy_attributes

if TYPE_CHECKING:
    from stageflow.runtime.batch import run_batch
    from stageflow.runtime.fingerprint import program_fingerprint
    from stageflow.runtime.journal import JournalError
    from stageflow.runtime.outcome import Usage
    from stageflow.runtime.process_backend import ProcessBackend, WorkerDiedError
    from stageflow.runtime.ray_backend import RayBackend
    from stageflow.runtime.runner import BackendError
    from stageflow.runtime.summary import BatchInterrupted, BatchRow, BatchSummary

__all__ = [
    "BackendError",
    "BatchInterrupted",
    "BatchRow",
    "BatchSummary",
    "JournalError",
    "ProcessBackend",
    "RayBackend",
    "Usage",
    "WorkerDiedError",
    "program_fingerprint",
    "run_batch",
]

_LOCATIONS = {
    "BackendError": "stageflow.runtime.runner",
    "BatchInterrupted": "stageflow.runtime.summary",
    "BatchRow": "stageflow.runtime.summary",
    "BatchSummary": "stageflow.runtime.summary",
    "JournalError": "stageflow.runtime.journal",
    "ProcessBackend": "stageflow.runtime.process_backend",
    "WorkerDiedError": "stageflow.runtime.process_backend",
    "RayBackend": "stageflow.runtime.ray_backend",
    "Usage": "stageflow.runtime.outcome",
    "program_fingerprint": "stageflow.runtime.fingerprint",
    "run_batch": "stageflow.runtime.batch",
}

__getattr__, __dir__ = lazy_attributes("stageflow.runtime", _LOCATIONS, globals())
