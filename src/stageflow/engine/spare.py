"""Spare threads for calls under a time limit: started on demand, one per call in flight.

The shared pool (:mod:`stageflow.engine.pool`) has a fixed size, and a fan-out may occupy all of
it. A call under a ``TimeoutPolicy`` must neither wait there for a worker (the wait would count
against its time limit, or never end while the fan-out waits on the call) nor keep a worker
forever once it is abandoned (later calls would find the pool full and "time out" without ever
running). So such a call runs on a spare thread: an idle one when there is one, else a new one.
A spare thread that has been idle for :data:`IDLE_SECONDS` exits, so none lingers after a run.
An abandoned call keeps its thread until it returns (Python cannot stop a thread); the caller
counts it (``on_abandon``).

Examples:
    >>> call_within(lambda: 6 * 7, 1.0, on_abandon=lambda: None)
    42
    >>> import time
    >>> call_within(lambda: time.sleep(0.5), 0.01, on_abandon=lambda: None)
    Traceback (most recent call last):
    ...
    TimeoutError

"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable
from time import monotonic
from typing import Any, TypeVar

__all__ = ["IDLE_SECONDS", "acall", "call_within", "run_detached", "spare_thread_count"]

T = TypeVar("T")

#: Seconds an idle spare thread waits for another call before it exits.
IDLE_SECONDS = 2.0


class _Spares:
    """Threads that each run one job at a time; a job goes to an idle thread or a new one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._jobs: deque[Callable[[], None]] = deque()
        self._idle = 0
        self._alive = 0
        self._started = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle > len(self._jobs):
                self._jobs.append(job)
                self._ready.notify()
                return
            self._started += 1
            self._alive += 1
            name = f"stageflow-spare-{self._started}"
        try:
            threading.Thread(target=self._work, args=(job,), name=name, daemon=True).start()
        except BaseException:
            with self._lock:
                self._alive -= 1
            raise

    def _work(self, job: Callable[[], None]) -> None:
        try:
            while True:
                job()  # never raises: the jobs below catch everything
                # (not kept while idle: a kept error's frames link back to this one, and what the
                # job holds — a fan-out's puller — must not sit in a cycle with it)
                del job
                with self._lock:
                    self._idle += 1
                    try:
                        deadline = monotonic() + IDLE_SECONDS
                        while not self._jobs:
                            left = deadline - monotonic()
                            if left <= 0:
                                return
                            self._ready.wait(left)
                        job = self._jobs.popleft()
                    finally:
                        self._idle -= 1
        finally:
            with self._lock:
                self._alive -= 1

    def alive(self) -> int:
        with self._lock:
            return self._alive


_SPARES = _Spares()


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's spare threads (they would be counted idle forever)."""
    global _SPARES
    _SPARES = _Spares()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def spare_thread_count() -> int:
    """Spare threads alive now (running a call, or idle for less than :data:`IDLE_SECONDS`)."""
    return _SPARES.alive()


class _Call:
    """One call on a spare thread: when it started, and how it ended."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.started = threading.Event()
        self.done = threading.Event()
        self.t0 = 0.0
        self.value: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        self.t0 = monotonic()
        self.started.set()
        try:
            self.value = self.fn()
        except BaseException as e:  # re-raised in the caller (KeyboardInterrupt included)
            self.error = e
        finally:
            self.done.set()


def call_within(
    fn: Callable[[], T],
    seconds: float,
    *,
    on_abandon: Callable[[], None],
    timeout_error: Callable[[], BaseException] = TimeoutError,
) -> T:
    """``fn()`` on a spare thread, waiting at most ``seconds`` from the moment it starts running.

    Raises:
        BaseException: ``timeout_error()`` when it ran longer; its thread is left to finish
            (``on_abandon()`` is called). What ``fn`` raised, when it failed in time.
    """
    call = _Call(fn)
    _SPARES.submit(call.run)
    try:
        call.started.wait()
        finished = call.done.wait(max(0.0, call.t0 + seconds - monotonic()))
    except BaseException:  # interrupted while waiting (Ctrl-C): the call runs on without us
        if not call.done.is_set():
            on_abandon()
        raise
    if not finished:
        on_abandon()
        raise timeout_error()
    if call.error is not None:
        raise call.error
    return call.value  # type: ignore[no-any-return]


async def acall(fn: Callable[[], T], *, on_abandon: Callable[[], None]) -> T:
    """Await ``fn()`` run on a spare thread; when the waiting task is cancelled (a timeout) while
    ``fn`` still runs, ``on_abandon()`` is called and ``fn`` is left to finish."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    finished = threading.Event()

    def settle(value: Any, error: BaseException | None) -> None:
        if future.done():  # the awaiting task gave up
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)

    def job() -> None:
        value: Any = None
        error: BaseException | None = None
        try:
            value = fn()
        except BaseException as e:
            error = e
        finished.set()
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits for this call any more
            loop.call_soon_threadsafe(settle, value, error)

    _SPARES.submit(job)
    try:
        return await future
    except asyncio.CancelledError:
        if not finished.is_set():
            on_abandon()
        raise


def run_detached(job: Callable[[], None]) -> None:
    """Run ``job`` on a spare thread (a daemon: the interpreter's exit does not wait for it). ``job``
    must not raise."""
    _SPARES.submit(job)
