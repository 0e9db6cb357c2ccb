"""The batch loop shared by every backend: worker threads, journal starts and results, Ctrl-C.

``workers`` threads each take the next ``chunk`` records (in input order), commit their start to
the journal together with the thread's previous results (see :mod:`.writer`), and hand them to the
backend's executor; a thread with no next record commits its last results on their own. Taking a
record is O(1); nothing scans the whole batch per completion. While the loop runs, the garbage
collector leaves the heap the batch started with alone (:mod:`.heap`).

Local runs use one record per worker and call the pipeline synchronously in the thread: on
DSPy 3.4.1 a sync ``Predict`` costs less CPU than ``Predict.acall`` (which moves request
preparation to a thread), so threads reached a higher share of ideal throughput than asyncio
tasks in ``benchmarks/batch.py``. Stages that are ``async def`` still run natively, on stageflow's
background loop.

Ctrl-C (in the main thread): the first one stops taking records and lets the records in flight
finish; a second one stops waiting for them (they stay ``running`` in the journal and run again,
counted as repeated work, on the next run).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from stageflow.errors import StageflowError
from stageflow.runtime.outcome import Outcome, Usage, error_info
from stageflow.runtime.records import Record
from stageflow.runtime.writer import JournalWriter

__all__ = ["BackendError", "Counters", "Executor", "LoopResult", "run_loop"]


class BackendError(StageflowError):
    """A batch backend failed beyond recovery (e.g. its worker processes kept dying): the batch
    stopped, and the journal keeps every finished record for a resume. Any other exception from a
    backend fails only the records it was running (error rows)."""

    default_code = "backend_failed"
    #: What the run did before it stopped (set by :func:`stageflow.run_batch`; ``None`` before).
    summary: Any = None


class Executor(Protocol):
    """How a backend runs records."""

    #: Worker threads (records, or chunks of records, in flight at once).
    workers: int
    #: Records one worker hands over at a time.
    chunk: int

    def thread_scope(self, worker: int) -> contextlib.AbstractContextManager[None]:
        """Entered once per worker thread (e.g. the DSPy settings the records run with)."""
        ...

    def run(self, worker: int, records: list[Record]) -> list[Outcome]:
        """Run ``records``; one outcome each, in order. May raise for infrastructure failures."""
        ...


@dataclass
class Counters:
    """What this run did, updated by the workers."""

    ran: int = 0
    ok: int = 0
    failed: int = 0
    repeated: int = 0
    retried: int = 0
    in_flight: int = 0
    usage: Usage = field(default_factory=Usage)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass
class LoopResult:
    counters: Counters
    interrupted: bool = False
    abandoned: bool = False
    fatal: BaseException | None = None


class _Feed:
    """The shared, lock-protected iterator of records to run."""

    def __init__(self, records: Iterator[Record]) -> None:
        self._it = records
        self._lock = threading.Lock()
        self.exhausted = False

    def take(self, n: int) -> list[Record]:
        with self._lock:
            if self.exhausted:
                return []
            out: list[Record] = []
            for rec in self._it:
                out.append(rec)
                if len(out) >= n:
                    break
            else:
                self.exhausted = True
            return out


def run_loop(
    records: Iterator[Record],
    executor: Executor,
    writer: JournalWriter,
    previous: Callable[[int], str],
    progress: Callable[[Counters], None],
    announce: Callable[[str], None] = lambda text: print(text, file=sys.stderr),
) -> LoopResult:
    """Run every record from ``records`` through ``executor``; returns when all are finished, or
    after an interruption or a fatal journal/input error.

    Args:
        records: The records to run, in input order.
        executor: The backend.
        writer: The journal writer of this run.
        previous: A record's status before this run (``running`` = interrupted earlier).
        progress: Called from the main thread about every 0.1 s with the counters.
        announce: Prints a line for the user (Ctrl-C messages).
    """
    feed = _Feed(records)
    counters = Counters()
    stop = threading.Event()
    result = LoopResult(counters)

    def fail(exc: BaseException) -> None:
        if type(exc) is KeyboardInterrupt:  # raised by a stage: the batch stops as on Ctrl-C
            result.interrupted = True
        elif result.fatal is None:
            result.fatal = exc
        stop.set()

    live = [executor.workers]
    live_lock = threading.Lock()
    finished = threading.Event()  # set by the last worker to stop: the main thread returns at once
    # Set (under the counters' lock) by a second Ctrl-C: what finishes afterwards is neither counted
    # nor journaled, so the summary and the journal agree (those records run again on resume).
    abandoned = threading.Event()

    def worker(k: int) -> None:
        # Results not yet handed to the writer: they go with this worker's next start (one commit),
        # or on their own when there is none.
        done: list[tuple[int, Outcome]] = []
        try:
            with executor.thread_scope(k):
                while not stop.is_set():
                    batch = feed.take(executor.chunk)
                    if not batch:
                        return
                    writer.start([r.seq for r in batch], done)
                    done = []
                    if writer.error is not None:
                        fail(writer.error)
                        return
                    with counters.lock:
                        counters.in_flight += len(batch)
                        for r in batch:
                            before = previous(r.seq)
                            counters.repeated += before == "running"
                            counters.retried += before == "failed"
                    try:
                        outcomes = executor.run(k, batch)
                    except BackendError:
                        raise  # (below: stops the batch)
                    except Exception as exc:  # the backend failed (e.g. a Ray worker died): error rows
                        info = error_info(exc)
                        outcomes = [Outcome(False, None, info, Usage(), 0.0) for _ in batch]
                    with counters.lock:
                        if abandoned.is_set():  # the run ended without them: they stay ``running``
                            return
                        done = [(rec.seq, out) for rec, out in zip(batch, outcomes, strict=True)]
                        counters.in_flight -= len(batch)
                        for out in outcomes:
                            counters.ran += 1
                            counters.ok += out.ok
                            counters.failed += not out.ok
                            counters.usage.add(out.usage)
        except BaseException as exc:  # the input changed, the journal failed...: stop the batch
            fail(exc)
        finally:
            for seq, out in done:
                writer.finish(seq, out)
            with live_lock:
                live[0] -= 1
                if live[0] == 0:
                    finished.set()

    ctx = contextvars.copy_context()
    threads = [
        threading.Thread(target=ctx.copy().run, args=(worker, k), name=f"stageflow-batch-{k}", daemon=True)
        for k in range(executor.workers)
    ]
    for t in threads:
        t.start()
    presses = 0
    # The main thread waits on an event, never Thread.join: on CPython 3.11 a join interrupted by
    # Ctrl-C can mark a still-running thread as finished (its records would be abandoned). The wait
    # ends when the last worker stops (not at the next poll: up to 50 ms at the end of every batch).
    while True:
        try:
            if finished.wait(0.05):
                break
            progress(counters)
        except KeyboardInterrupt:
            presses += 1
            result.interrupted = True
            stop.set()
            if presses == 1:
                announce(
                    f"\nstopping: letting {counters.in_flight} record(s) in flight finish "
                    "(press Ctrl-C again to stop without waiting)"
                )
            else:
                announce("stopping now: records still in flight will run again on resume")
                with counters.lock:
                    abandoned.set()
                result.abandoned = True
                break
    progress(counters)
    return result
