"""A long-lived pool of worker threads that can run a job without making a future for it.

``concurrent.futures.ThreadPoolExecutor.submit`` makes a ``Future`` for every job: a condition
variable to build, and its lock taken again when the job starts and when it ends. Its workers also
count themselves idle through a ``threading.Semaphore`` written in Python, after every job. A sync
fan-out of hundreds of light branches wakes hundreds of threads at once, and they queue for the GIL
through all of that (BENCHMARKS.md, twenty-second pass: a ``ForEach`` of 512 sleeping branches at
1.16–1.22× a thread pool's ``map`` with it, 1.04–1.06× without).

A fan-out's workers report through the fan-out's own state and need no future:
:meth:`Workers.run_soon` queues such a job. Code that does need one (``loop.run_in_executor``) calls
:meth:`Workers.submit`, the ``concurrent.futures.Executor`` API. Idle workers are counted in a list
that workers append to and submitters pop from (both atomic), so a worker going idle takes no lock.

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
    >>> pool.run_soon(ran.set)
    >>> ran.wait(5)
    True
    >>> pool.shutdown()
    >>> pool.run_soon(ran.set)
    Traceback (most recent call last):
    ...
    RuntimeError: cannot run new jobs after the pool was shut down
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, TypeVar

__all__ = ["Workers"]

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
        # One entry per worker that finished a job and waits for the next one: workers append
        # (atomic, no lock), ``run_soon`` pops under ``_lock`` (only it removes entries).
        self._idle: list[None] = []
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()  # (starting threads, shutting down)
        self._shutdown = False
        _POOLS.add(self)
        # A pool dropped without ``shutdown`` ends its workers (they hold its queue, not the pool):
        # waiting threads that are not daemons would otherwise keep the interpreter from exiting.
        weakref.finalize(self, self._queue.put, None).atexit = False

    def run_soon(self, fn: Callable[..., Any], /, *args: Any) -> None:
        """Run ``fn(*args)`` on a worker thread, without a future: its result is dropped, and an
        exception it raises is logged (a job should report through state of its own).

        Raises:
            RuntimeError: The pool was shut down (or the interpreter is exiting); the job is not
                queued. A thread could not be started, with no worker idle.
        """
        with self._lock:
            if self._shutdown or _EXITING[0]:
                raise RuntimeError("cannot run new jobs after the pool was shut down")
            if self._idle:
                self._idle.pop()
            elif len(self._threads) < self._max_workers:
                self._start()  # (before the job is queued: when it fails, nothing waits in vain)
            self._queue.put((fn, args))

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

    def _start(self) -> None:
        name = f"{self._prefix}_{len(self._threads)}"
        t = threading.Thread(target=_work, args=(self._queue, self._idle), name=name, daemon=_DAEMON)
        t.start()
        self._threads.add(t)


def _work(jobs: queue.SimpleQueue[_Job | None], idle: list[None]) -> None:
    """A worker: run jobs until the pool's end mark (which it puts back for the others)."""
    while True:
        job = jobs.get()
        if job is None:
            jobs.put(None)
            return
        fn, args = job
        try:
            fn(*args)
        except BaseException:
            # (a job reports through its own state; one that raises anyway must not end the thread,
            # which the pool would still count)
            logger.critical("stageflow: a worker thread's job raised", exc_info=True)
        del job, fn, args
        idle.append(None)


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
