"""The local backend: records run in worker threads of this process."""

from __future__ import annotations

import contextlib
from typing import Any

from stageflow.runtime.outcome import Outcome, run_record
from stageflow.runtime.records import Record

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Runs one record per worker thread, ``concurrency`` threads, with the run's DSPy settings.

    The threads run in copies of the caller's context, so ``dspy.context`` settings and the
    stageflow concurrency budget (``stageflow.limits`` / ``stageflow.configure``) apply to every
    record and to the fan-outs inside it.
    """

    name = "local"
    chunk = 1

    def __init__(self, program: Any, settings: dict[str, Any], concurrency: int) -> None:
        self.program = program
        self.settings = settings
        self.workers = concurrency

    def thread_scope(self, worker: int) -> contextlib.AbstractContextManager[Any]:
        if not self.settings:
            return contextlib.nullcontext()
        import dspy

        return dspy.context(**self.settings)  # type: ignore[no-any-return]

    def run(self, worker: int, records: list[Record]) -> list[Outcome]:
        return [run_record(self.program, rec.inputs) for rec in records]

    def close(self) -> None:
        return None
