"""A long-lived pool of worker threads that can run a job without making a future for it.

``concurrent.futures.ThreadPoolExecutor.submit`` makes a ``Future`` for every job: a condition
variable to build, and its lock taken again when the job starts and when it ends. Its workers also
count themselves idle through a ``threading.Semaphore`` written in Python, after every job. A sync
fan-out of hundreds of light branches wakes hundreds of threads at once, and they queue for the GIL
through all of that (BENCHMARKS.md, twenty-second pass: a ``ForEach`` of 512 sleeping branches at
1.16–1.22× a thread pool's ``map`` with it, 1.04–1.06× without).

A fan-out's workers report through the fan-out's own state and need no future:
:meth:`Workers.run_soon` queues such a job, and says whether a worker takes it now (when none does,
the fan-out's caller runs branches itself rather than wait). Code that does need a future
(``loop.run_in_executor``) calls :meth:`Workers.submit`, the ``concurrent.futures.Executor`` API.
Each worker counts itself in a list while it waits for a job (an atomic append and pop of its own),
so a worker going idle takes no lock, and the count cannot drift.

Otherwise the pool behaves as ``ThreadPoolExecutor`` does: threads start on demand up to
``max_workers`` and live on; at the interpreter's exit, the jobs already queued run and the workers
are joined (as ``ThreadPoolExecutor``'s are). The workers are not daemon threads, whichever thread
started them.

Examples:
    >>> pool = Workers(2, thread_name_prefix="doc")
    >>> pool.submit(pow, 2, 10).result()
    1024
    >>> import threading
    >>> ran = threading.Event()
    >>> pool.run_soon(ran.set)  # (a worker started for it)
    True
    >>> ran.wait(5)
    True
    >>> pool.shutdown()
    >>> pool.run_soon(ran.set)
    Traceback (most recent call last):
    ...
    RuntimeError: cannot run new jobs after the pool was shut down
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = ["Workers", "exiting"]

T = TypeVar("T")

logger = logging.getLogger("stageflow")

_Job = tuple[Callable[..., Any], tuple[Any, ...]]

# (every pool alive, to wake and join at the interpreter's exit)
_POOLS: weakref.WeakSet[Workers] = weakref.WeakSet()
_EXITING = [False]


class Workers(Executor):
    """Threads started on demand, up to ``max_workers``, that run queued jobs in order.

    Args:
        max_workers: The most threads the pool starts.
        thread_name_prefix: Threads are named ``<prefix>_<n>``.
    """

    def __init__(self, max_workers: int, thread_name_prefix: str = "stageflow-worker") -> None:
        if max_workers <= 0:
            raise ValueError(f"max_workers must be greater than 0, got {max_workers}")
        self._max_workers = max_workers
        self._prefix = thread_name_prefix
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        # One entry per worker waiting in the queue's ``get`` (each worker appends its own before it
        # waits and pops one when it has a job: atomic, no lock, and nothing to drift at rest).
        self._waiting: list[None] = []
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()  # (starting threads, shutting down)
        self._shutdown = False
        _POOLS.add(self)
        # A pool dropped without ``shutdown`` ends its workers (they hold its queue, not the pool):
        # waiting threads that are not daemons would otherwise keep the interpreter from exiting.
        weakref.finalize(self, self._queue.put, None).atexit = False

    def run_soon(self, fn: Callable[..., Any], /, *args: Any) -> bool:
        """Run ``fn(*args)`` on a worker thread, without a future: its result is dropped, and an
        exception it raises is logged (a job should report through state of its own).

        Returns ``True`` when a worker was idle or a new one started for it; ``False`` when every
        worker is busy and the job waits for one of them to finish (a caller that can run the work
        itself should not wait for it).

        Raises:
            RuntimeError: The pool was shut down (or the interpreter is exiting); the job is not
                queued. A thread could not be started and the pool has none yet (with threads, the
                job waits for one of them).
        """
        with self._lock:
            if self.closed:
                raise RuntimeError("cannot run new jobs after the pool was shut down")
            # (more workers waiting than jobs queued: one of them takes this one)
            taken = len(self._waiting) > self._queue.qsize()
            if not taken and len(self._threads) < self._max_workers:
                try:
                    self._start((fn, args))  # (the job is the new thread's first: never queued)
                    return True
                except RuntimeError:  # ("can't start new thread": a process or container limit)
                    if not self._threads:
                        raise
                    # (the workers there are take it when one is free: fewer threads, not a failure)
            self._queue.put((fn, args))
            return taken

    @property
    def closed(self) -> bool:
        """Whether the pool takes no more jobs (shut down, or the interpreter is exiting)."""
        return self._shutdown or _EXITING[0]

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """``fn(*args, **kwargs)`` on a worker thread; its ``Future`` (the ``Executor`` API)."""
        future: Future[T] = Future()
        self.run_soon(_settle, future, fn, args, kwargs)
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Run no new jobs; the queued ones still run, except the futures of :meth:`submit` that
        ``cancel_futures`` cancels. ``wait``: join the workers (never the calling one)."""
        with self._lock:
            self._shutdown = True
            if cancel_futures:
                kept: list[_Job | None] = []
                while True:
                    try:
                        job = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if job is not None and job[0] is _settle and job[1][0].cancel():
                        continue
                    kept.append(job)
                for job in kept:
                    self._queue.put(job)
            self._queue.put(None)  # (each worker that takes it puts it back for the next)
            threads = list(self._threads)
        if wait:
            me = threading.current_thread()
            for t in threads:
                if t is not me:
                    t.join()

    def _start(self, job: _Job) -> None:
        name = f"{self._prefix}_{len(self._threads)}"
        # (handed over in a list the worker empties: the thread keeps its arguments while it runs)
        t = threading.Thread(
            target=_work, args=(self._queue, self._waiting, [job]), name=name, daemon=_DAEMON
        )
        t.start()  # (when it cannot start, the job was not queued: the caller gets the error)
        self._threads.add(t)


def _work(jobs: queue.SimpleQueue[_Job | None], waiting: list[None], first: list[_Job]) -> None:
    """A worker: run its first job, then queued jobs, until the pool's end mark (which it puts back
    for the others); counted in ``waiting`` while it waits for one."""
    job: _Job | None = first.pop()
    while job is not None:
        fn, args = job
        del job
        try:
            fn(*args)
        except BaseException:
            # (a job reports through its own state; one that raises anyway must not end the thread,
            # which the pool would still count — nor may a logging handler or filter that raises)
            with contextlib.suppress(BaseException):
                logger.critical("stageflow: a worker thread's job raised", exc_info=True)
        del fn, args  # (before waiting: what the job holds is not kept alive by an idle worker)
        waiting.append(None)
        job = jobs.get()
        waiting.pop()
    jobs.put(None)


def _settle(
    future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Run one :meth:`Workers.submit` job into its future."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        result = fn(*args, **kwargs)
    except BaseException as e:
        future.set_exception(e)
        # (the error's traceback holds this frame: it must not hold the future that holds the error)
        del future, fn, args, kwargs
    else:
        future.set_result(result)


def exiting() -> bool:
    """Whether the interpreter has begun to exit (no pool takes jobs any more)."""
    return _EXITING[0]


def _at_exit() -> None:
    """Let every pool's queued jobs run, then join its workers (before the interpreter goes)."""
    _EXITING[0] = True
    for pool in list(_POOLS):
        pool.shutdown(wait=True)


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's workers (and a lock one of them held stays held)."""
    _POOLS.clear()


# Joined before the interpreter joins its own non-daemon threads, as ``ThreadPoolExecutor``'s are
# (``threading._register_atexit``, in every Python stageflow supports). Without that hook the workers
# would be daemon threads, which the exit does not wait for.
_register = getattr(threading, "_register_atexit", None)
_DAEMON = _register is None
if _register is not None:
    _register(_at_exit)

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
