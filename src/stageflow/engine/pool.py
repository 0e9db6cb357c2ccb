"""The shared, long-lived thread pool and background event loop (never one per call)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import CancelledError as FutureCancelledError
from typing import Any

from stageflow.engine import spare
from stageflow.engine.config import CONFIG, on_change
from stageflow.engine.loop_executor import LoopExecutor
from stageflow.engine.loop_watchdog import watch
from stageflow.engine.stopping import StopSignal, abandonable, enclosing_fan_out
from stageflow.engine.streaming import lending, loop_token
from stageflow.engine.workers import Workers, exiting

__all__ = [
    "abandon",
    "abandoned_threads",
    "available_cpus",
    "note_abandoned",
    "on_background_loop",
    "run_on_background_loop",
    "run_soon",
    "shared_pool",
    "submit",
    "spare_threads",
    "to_thread",
]


_POOL: list[Workers | None] = [None]
_POOL_LOCK = threading.Lock()
_ABANDONED = [0]


def shared_pool() -> Workers:
    """The long-lived pool every sync fan-out and every ``to_thread`` call uses (a
    :class:`~stageflow.engine.workers.Workers`: a fan-out's workers need no future)."""
    pool = _POOL[0]
    if pool is None:
        with _POOL_LOCK:
            pool = _POOL[0]
            if pool is None:
                pool = Workers(CONFIG.max_threads, thread_name_prefix="stageflow")
                _POOL[0] = pool
    return pool


def run_soon(fn: Callable[..., Any], /, *args: Any) -> bool:
    """``fn(*args)`` on the shared pool, without a future (:meth:`Workers.run_soon`): ``True`` when a
    worker takes it now, ``False`` when the caller should do the work itself if it can — every
    worker is busy (the job waits for one), or the interpreter is exiting and no pool takes jobs
    (the job is not run). A pool that ``configure(max_threads=...)`` replaced meanwhile hands the
    job to the new one: a fan-out running across that change does not fail."""
    try:
        return _on_current_pool(Workers.run_soon, fn, args)  # type: ignore[no-any-return]
    except RuntimeError:
        if exiting():
            return False
        raise


def submit(fn: Callable[..., Any], /, *args: Any) -> Any:
    """``fn(*args)`` on the shared pool, with its future (a pool replaced meanwhile: see :func:`run_soon`)."""
    return _on_current_pool(Workers.submit, fn, args)


def _on_current_pool(method: Callable[..., Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
    """``method(pool, fn, *args)`` on the shared pool; again on the new one when ``configure()``
    replaced that pool meanwhile (it refuses jobs once shut down)."""
    while True:
        pool = shared_pool()
        try:
            return method(pool, fn, *args)
        except RuntimeError:
            # (no thread could start in a pool without any; the interpreter is exiting; or a pool
            # shut down by hand that is still the shared one: the caller's to handle)
            if not pool.closed or exiting() or _POOL[0] is pool:
                raise


def _reset_pool(name: str = "max_threads", value: Any = None) -> None:
    if name != "max_threads":
        return
    with _POOL_LOCK:
        old, _POOL[0] = _POOL[0], None
    if old is not None:
        old.shutdown(wait=False)


on_change(_reset_pool)


def _after_fork_in_child() -> None:
    """A forked child (the batch process backend) has none of the parent's threads: forget the
    pool and the background loop (and a lock another thread may have held) so they start afresh."""
    global _POOL_LOCK
    _POOL_LOCK = threading.Lock()
    _POOL[0] = None
    _LOOP[0] = None


async def to_thread(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Run ``fn`` on stageflow's long-lived pool from async code, in a copy of the context.

    Unlike ``asyncio.to_thread`` (the loop's default executor: ``min(32, cpus + 4)`` threads),
    this never caps concurrency below what the user set.
    """
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    call = functools.partial(_no_stop_iteration, fn, functools.partial(ctx.run, fn, *args, **kwargs))
    token = loop_token()  # under dspy.streamify: the thread may send chunks to its stream
    if token is not None:
        call = functools.partial(_lent, token, call)
    # Abandoned when the awaiting task is cancelled (a timeout, Ctrl-C, the caller's own cancel) while
    # the thread runs on: the fan-outs it started stop and its further LM calls are refused.
    with abandonable(ctx) as signal:
        try:
            if _SPARE.get():  # (under a time limit: a spare thread, never a shared-pool worker)
                return await spare.acall(call, on_abandon=lambda: abandon(signal))
            try:
                return await asyncio.wrap_future(submit(call), loop=loop)
            except asyncio.CancelledError:
                signal.abandon()
                raise
        except _CarriedError as carried:
            error = carried.error
    raise error  # (the function's own concurrent.futures.CancelledError, as a sync call raises it)


def abandon(signal: StopSignal, reason: str = "its caller gave up") -> None:
    """A call left to finish on its thread: counted, what it started is stopped, and the LM calls it
    would make from now on are refused."""
    note_abandoned()
    signal.abandon(reason)


def _no_stop_iteration(fn: Any, call: Callable[[], Any]) -> Any:
    """``call()`` (of ``fn``), with a ``StopIteration`` it raises turned into a ``RuntimeError`` (as
    Python does for generators): an asyncio future cannot hold one, and the awaiting task would
    wait forever. A ``concurrent.futures.CancelledError`` it raises (a future of its own it waited
    on was cancelled) is carried across: the executor's future would make it asyncio's
    ``CancelledError``, an interrupt rather than the function's error, unlike a sync call."""
    try:
        return call()
    except StopIteration as e:
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise RuntimeError(f"{name} raised StopIteration") from e
    except FutureCancelledError as e:
        raise _CarriedError(e) from None


class _CarriedError(Exception):
    """An exception of the function's carried across an executor's future unchanged."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


def _lent(token: Any, call: Callable[[], Any]) -> Any:
    with lending(token):
        return call()


_SPARE: contextvars.ContextVar[bool] = contextvars.ContextVar("stageflow_spare_threads", default=False)


@contextlib.contextmanager
def spare_threads() -> Iterator[None]:
    """Inside the block, :func:`to_thread` runs calls on spare threads (:mod:`stageflow.engine.spare`)
    instead of the shared pool: a call under a time limit neither waits for a pool worker nor keeps
    one when it is abandoned."""
    token = _SPARE.set(True)
    try:
        yield
    finally:
        _SPARE.reset(token)


def abandoned_threads() -> int:
    """How many timed-out branch threads were abandoned (still running or finished late)."""
    return _ABANDONED[0]


def note_abandoned(n: int = 1) -> None:
    """Count ``n`` threads whose call timed out but could not be stopped."""
    with _POOL_LOCK:
        _ABANDONED[0] += n


_LOOP: list[asyncio.AbstractEventLoop | None] = [None]


def _background_loop() -> asyncio.AbstractEventLoop:
    loop = _LOOP[0]
    if loop is None:
        with _POOL_LOCK:
            loop = _LOOP[0]
            if loop is None:
                loop = asyncio.new_event_loop()
                # (DSPy's short LM-call steps in line: see stageflow.engine.loop_executor)
                workers = min(32, (os.cpu_count() or 1) + 4)  # (asyncio's own default)
                loop.set_default_executor(LoopExecutor(workers, thread_name_prefix="stageflow-loop-worker"))
                serving = threading.Thread(target=_serve, args=(loop,), name="stageflow-loop", daemon=True)
                serving.start()
                watch(loop, serving)  # (names code of yours that blocks the loop)
                _LOOP[0] = loop
    return loop


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """Run the background loop for good. A task that raises ``KeyboardInterrupt`` or ``SystemExit``
    stops ``run_forever`` (asyncio re-raises them out of the loop after storing them in the task):
    the loop goes on, so the task's caller receives the exception instead of waiting forever."""
    while True:
        try:
            loop.run_forever()
            return  # stopped on purpose
        except (KeyboardInterrupt, SystemExit):
            continue


def on_background_loop() -> bool:
    """Whether the current thread is stageflow's background event loop (never block it)."""
    try:
        return asyncio.get_running_loop() is _LOOP[0]
    except RuntimeError:
        return False


def run_on_background_loop(coro: Awaitable[Any], stop_with: Any = None) -> Any:
    """Run ``coro`` on stageflow's long-lived event loop and wait (the caller's context follows).

    ``stop_with``: a stop signal (``register`` / ``discard``, see ``stageflow.engine.stopping``) that
    cancels the coroutine when it fires; by default the enclosing one of the work running here (the
    coroutine stops with the fan-out branch or timed call it runs in)."""
    if stop_with is None:
        stop_with = enclosing_fan_out()
    future: Any = asyncio.run_coroutine_threadsafe(coro, _background_loop())  # type: ignore[arg-type]
    if stop_with is not None:
        stop_with.register(future.cancel)
    try:
        return future.result()
    except FutureCancelledError as e:
        # The coroutine ended cancelled (it raised CancelledError itself, e.g. leaked from an inner
        # task): an interrupt, as on the async path, never an ordinary stage failure (an
        # ``Exception`` a fan-out would collect).
        raise asyncio.CancelledError(*e.args) from e
    except asyncio.CancelledError as e:
        if future.done() and not future.cancelled():
            # The coroutine raised concurrent.futures.CancelledError (a future of its own it waited
            # on was cancelled), which asyncio turned into its CancelledError on the way here: the
            # coroutine's own error, as an async call raises it.
            raise FutureCancelledError(*e.args) from None
        future.cancel()
        raise
    except BaseException:
        future.cancel()  # interrupted while waiting (Ctrl-C): the coroutine must not run on
        raise
    finally:
        if stop_with is not None:
            stop_with.discard(future.cancel)


def available_cpus() -> int:
    """CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
