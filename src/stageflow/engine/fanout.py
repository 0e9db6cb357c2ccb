"""Fan-out: run branch thunks concurrently (threads or tasks); one outcome per branch, in order."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any, Literal

from stageflow.engine import spare
from stageflow.engine.config import CONFIG
from stageflow.engine.pool import note_abandoned, run_soon
from stageflow.engine.stopping import (
    StopSignal,
    abandonable,
    enclosing_fan_out,
    run_under,
)
from stageflow.engine.streaming import lending, loop_token
from stageflow.errors import ConfigurationError
from stageflow.stages import note_degraded

__all__ = [
    "BranchOutcome",
    "BranchTimeoutError",
    "FailurePolicy",
    "StopSignal",
    "abandonable",
    "afan_out",
    "enclosing_fan_out",
    "fan_out",
    "note_failed_branches",
]

logger = logging.getLogger("stageflow")

FailurePolicy = Literal["collect", "skip", "fail_fast"]
POLICIES = ("collect", "skip", "fail_fast")

# How long the caller waits for a pool worker before running a branch itself (seconds).
_STARVATION_CHECK = 0.05


class BranchTimeoutError(TimeoutError):
    """A fan-out branch ran past its timeout (``index`` is its position)."""

    def __init__(self, index: int, seconds: float) -> None:
        super().__init__(f"branch {index} timed out after {seconds}s")
        self.index = index
        self.seconds = seconds


@dataclass(slots=True)
class BranchOutcome:
    """What one branch of a fan-out did.

    Attributes:
        index: Position in the fan-out's input order.
        ok: ``True`` when the branch returned a value.
        value: The branch's return value (``None`` on failure).
        error: The exception, when it failed (a ``TimeoutError`` for a timeout).
        elapsed: Wall seconds the branch ran (or until it was abandoned).
        status: ``"ok"``, ``"error"``, ``"timeout"``, ``"cancelled"`` (abandoned after fail_fast or
            ``until``) or ``"skipped"`` (never started).
    """

    index: int
    ok: bool = False
    value: Any = None
    error: BaseException | None = None
    elapsed: float = 0.0
    status: str = "skipped"


class _Detached:
    """``run_soon`` on spare threads (:func:`stageflow.engine.spare.run_detached`)."""

    def run_soon(self, fn: Callable[..., None], *args: Any) -> bool:
        spare.run_detached(functools.partial(fn, *args))
        return True  # (an idle spare thread or a new one: never queued)


_DETACHED = _Detached()


class _Shared:
    """``run_soon`` on the shared pool (:func:`stageflow.engine.pool.run_soon`)."""

    def run_soon(self, fn: Callable[..., None], *args: Any) -> bool:
        return run_soon(fn, *args)


_SHARED = _Shared()


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise ConfigurationError(
            f"on_error must be one of {list(POLICIES)}, got {policy!r}.", field="on_error", code="bad_option"
        )


class _SyncFanOut:
    """State of one threaded fan-out: pullers take the next branch until none are left."""

    def __init__(
        self,
        thunks: Sequence[Callable[[], Any]],
        window: int,
        policy: str,
        timeout: float | None,
        until: Callable[[list[BranchOutcome]], bool] | None,
    ) -> None:
        self.thunks = thunks
        self.n = len(thunks)  # (read per branch: a sequence's __len__ may be Python code)
        self.window = window
        self.policy = policy
        self.timeout = timeout
        self.until = until
        self.outcomes = [BranchOutcome(i) for i in range(len(thunks))]
        self.next = 0
        self.done = 0
        self.timeouts = 0
        self.running: dict[int, float] = {}
        self.stopped = False
        self.cond = threading.Condition()
        self.first_error: BaseException | None = None
        self.idle_since: float | None = None
        # A worker handed out found every pool thread busy (nested fan-outs, a small max_threads):
        # when nothing runs, the caller runs a branch itself at once (see starved).
        self.saturated = False
        self.fatal: BaseException | None = None
        self.caller = threading.current_thread()
        # With no timeout and no early stop to decide, taking and finishing a branch need no lock:
        # counters whose next() is atomic, and per-branch writes. Hundreds of threads waking at
        # once would otherwise queue on one lock (the lock is still taken to stop and to wake).
        self.lockfree = timeout is None and until is None
        self._taken = itertools.count()
        self._finished = itertools.count(1)
        self.all_done = False
        # When branches may be left running — a timeout, ``fail_fast`` or ``until`` — each running
        # branch has a stop signal of its own (the enclosing one of what it starts): a branch
        # abandoned at its timeout, or left running when the fan-out ended early, stops the fan-outs
        # and event-loop calls it started, and the LM calls it would still make are refused (the
        # branches that finished keep theirs: a lazy result of theirs may still be resolved).
        # Otherwise the branches share the fan-out's (``signal``). Stopping the fan-out from
        # outside stops every branch's (``stop``).
        self.signal: StopSignal | None = None
        self.own_signals = timeout is not None or until is not None or policy == "fail_fast"
        self.branch_signals: dict[int, StopSignal] = {}
        self.halted = False  # (stopped from outside: see stop)
        self.abandoned: set[int] = set()  # (timed out, or left running when the fan-out ended)

    def take(self) -> int | None:
        if self.lockfree:
            if self.stopped:
                return None
            i = next(self._taken)
            if i >= self.n:
                return None
            self.running[i] = perf_counter()
            if self.stopped:  # stopped meanwhile: this branch never starts
                self.running.pop(i, None)
                return None
            if i >= self.next:
                self.next = i + 1  # (a hint for starved(); a lagging value only delays it)
            self.idle_since = None
            return i
        with self.cond:
            if self.stopped or self.next >= self.n:
                return None
            i = self.next
            self.next += 1
            self.running[i] = perf_counter()
            self.idle_since = None
            return i

    def _write(self, i: int, value: Any, error: BaseException | None, t0: float) -> None:
        """Branch ``i``'s outcome (only the thread that ran it writes it)."""
        o = self.outcomes[i]
        o.elapsed = perf_counter() - t0
        if error is None:
            o.ok, o.value, o.status = True, value, "ok"
        else:
            o.error, o.status = error, "error"

    def finish(self, i: int, value: Any, error: BaseException | None, t0: float) -> None:
        if self.lockfree:
            if self.own_signals:
                self.branch_signals.pop(i, None)
            if self.running.pop(i, None) is None:  # abandoned meanwhile: the result is dropped
                return
            self._write(i, value, error, t0)
            if error is not None and self.policy == "fail_fast":
                with self.cond:
                    if self.first_error is None:
                        self.first_error, self.stopped = error, True
                    self.cond.notify_all()
            if next(self._finished) == self.n:
                with self.cond:
                    self.all_done = True
                    self.cond.notify_all()
            return
        with self.cond:
            self.branch_signals.pop(i, None)
            if i not in self.running:  # timed out or abandoned meanwhile: the result is dropped
                return
            del self.running[i]
            self._write(i, value, error, t0)
            if error is not None and self.policy == "fail_fast" and self.first_error is None:
                self.first_error = error
                self.stopped = True
            self.done += 1
            if self.until is not None and not self.stopped and self.until(self.outcomes):
                self.stopped = True
            if self.timeout is not None or self.finished():
                self.cond.notify_all()  # wake the caller only when it has something to do

    def pull(self, ctx: contextvars.Context) -> None:
        try:
            while self.pull_one(ctx):
                pass
        except BaseException:
            if threading.current_thread() is self.caller:
                raise  # the caller re-raises it (after stopping the fan-out)
            # A worker thread: the fan-out's caller re-raises it; the pool thread carries on.
        finally:
            # (a kept branch error's frames link back to this one: it must not hold the fan-out,
            # whose outcomes hold the error, or they would all sit in a reference cycle)
            del self

    def pull_one(self, ctx: contextvars.Context) -> bool:
        """Run the next branch, if any is left; ``False`` when there was none."""
        i = self.take()
        if i is None:
            return False
        t0 = perf_counter()
        branch = ctx.copy()
        if self.own_signals:
            self._own_signal(i, branch)
        try:
            value = branch.run(self.thunks[i])
        except Exception as e:
            tb = e.__traceback__
            if tb is not None and tb.tb_frame is sys._getframe():
                e.__traceback__ = tb.tb_next  # (this frame is the engine's, not where it failed)
            del tb
            self.finish(i, None, e, t0)
            # (the error's frames link back to this one, which must then not hold the fan-out, whose
            # outcomes hold the error: or every branch's value would sit in a reference cycle)
            del self, branch
            return True
        except BaseException as e:
            # KeyboardInterrupt, SystemExit...: never a branch failure. Stop the fan-out (no new
            # branch starts) and re-raise in the caller.
            self.abort(i, e, t0)
            raise
        else:
            self.finish(i, value, None, t0)
        return True

    def _own_signal(self, i: int, branch: contextvars.Context) -> None:
        """Branch ``i`` (about to run in ``branch``) gets its own stop signal (see ``__init__``)."""
        signal = StopSignal(self.signal)
        if self.lockfree:  # (fail_fast alone: no lock per branch; set first, then checked)
            self.branch_signals[i] = signal
            if i in self.abandoned:
                signal.abandon("its fan-out ended early")  # (left behind before it began)
            elif self.halted:
                signal.stop()
        else:
            with self.cond:
                if i not in self.running:  # (timed out, or left behind, before it began)
                    timed_out = self.outcomes[i].status == "timeout"
                    signal.abandon("its timeout passed" if timed_out else "its fan-out ended early")
                else:
                    self.branch_signals[i] = signal
                    if self.halted:
                        signal.stop()
        # (published in DSPy's settings too: DSPy's worker threads the branch starts — dspy.Parallel,
        # Module.batch — copy those, not the context; ~0.5 µs per branch)
        run_under(branch, signal)

    def stop_branch(self, i: int, reason: str = "its timeout passed") -> None:
        """Stop what branch ``i`` started (it was abandoned; call under ``cond``)."""
        signal = self.branch_signals.pop(i, None)
        if signal is not None:
            signal.abandon(reason)

    def abort(self, i: int, error: BaseException, t0: float) -> None:
        with self.cond:
            if i in self.abandoned:
                # An abandoned branch (timed out, or left running after fail_fast / ``until``),
                # whose own work was stopped: what it raises now reaches nobody.
                return
            self.running.pop(i, None)
            o = self.outcomes[i]
            o.elapsed, o.error, o.status = perf_counter() - t0, error, "cancelled"
            if self.fatal is None:
                self.fatal = error
            self.stopped = True
            self.cond.notify_all()
        if self.signal is not None:
            # (at once, not when the caller sees it: a caller that runs a branch too would see it only
            # once that branch ends, and the other branches' work would go on meanwhile)
            self.signal.abandon()

    def stop(self) -> None:
        """Start no more branches, and stop what the running ones started (called through the
        fan-out's signal: its caller gave up, or the fan-out ended early)."""
        with self.cond:
            self.stopped = self.halted = True
            signals = list(self.branch_signals.values())
            self.cond.notify_all()
        for signal in signals:
            signal.stop()

    def starved(self) -> bool:
        """Unstarted branches, nothing running, and no worker has arrived: at once when the pool was
        full as the workers were handed out, else after a while (call under ``cond``). (Never while a
        branch runs: the caller stays free to stop the fan-out at the first error or at ``until``.)"""
        if self.stopped or self.next >= self.n or self.running:
            return False
        if self.saturated:
            return True
        now = perf_counter()
        if self.idle_since is None:
            self.idle_since = now
            return False
        return now - self.idle_since >= _STARVATION_CHECK

    def finished(self) -> bool:
        if self.fatal is not None:
            return True
        if self.all_done or self.done + self.timeouts >= self.n:
            return True
        return self.stopped and (not self.running or self.policy == "fail_fast" or self.until is not None)


def _lent(token: Any, fn: Callable[[contextvars.Context], None], ctx: contextvars.Context) -> None:
    try:
        with lending(token):
            fn(ctx)
    finally:
        del fn  # (the fan-out's puller: see _SyncFanOut.pull)


def fan_out(
    thunks: Sequence[Callable[[], Any]],
    *,
    max_concurrency: int | None = None,
    on_error: FailurePolicy = "collect",
    timeout: float | None = None,
    until: Callable[[list[BranchOutcome]], bool] | None = None,
    on_start: Callable[[Callable[[], None]], None] | None = None,
) -> list[BranchOutcome]:
    """Run ``thunks`` concurrently on threads; see the module docstring.

    ``on_start`` receives a function that abandons the fan-out from another thread (its caller gave
    up: no branch starts after it; running ones finish, the LM calls they would make are refused).
    """
    _check_policy(on_error)
    n = len(thunks)
    if n == 0:
        return []
    window = min(n, max_concurrency or n, CONFIG.max_threads + 1)
    run = _SyncFanOut(thunks, window, on_error, timeout, until)
    # Stopping this fan-out from outside (its caller gave up) also stops the ones its branches start.
    enclosing = enclosing_fan_out()
    signal = StopSignal(enclosing)
    signal.register(run.stop)
    run.signal = signal
    if on_start is not None:
        on_start(signal.abandon)
    if enclosing is not None:
        enclosing.register(signal.stop)
    ctx = contextvars.copy_context()
    run_under(ctx, signal)  # (DSPy's worker threads the branches start see it too: one per fan-out)
    # A fan-out that times branches out runs them on spare threads: an abandoned branch keeps no
    # pool worker, and the interpreter's exit does not wait for it (pool workers are joined at exit).
    pool: Any = _SHARED if timeout is None else _DETACHED
    # The caller works too (progress even when the pool is saturated by nested fan-outs), unless
    # the fan-out may have to stop early or time branches out: then it only waits and watches.
    caller_works = timeout is None and until is None and on_error != "fail_fast"
    token = loop_token()  # under dspy.streamify: pool threads may send chunks to its stream
    work = run.pull if token is None else functools.partial(_lent, token, run.pull)
    try:
        # (inside the try: an interrupt while the workers are being submitted stops them too)
        for _ in range(window - 1 if caller_works else window):
            if not pool.run_soon(work, ctx):
                run.saturated = True
        if caller_works:
            run.pull(ctx)
        if _wait(run, ctx, pool, n, timeout, on_error):
            signal.stop()  # (branches it abandoned, after fail_fast or ``until``: what they started stops)
    except BaseException as e:
        # Interrupted (Ctrl-C in the caller, or a branch raised KeyboardInterrupt/SystemExit):
        # start nothing more, here or in the fan-outs running branches started; branches already
        # running on other threads cannot be stopped (their LM calls are refused).
        signal.abandon()
        with run.cond:
            run.stopped = True
            for i in list(run.running):
                run.abandoned.add(i)
                run.outcomes[i].status = "cancelled"
                note_abandoned()
            run.running.clear()
        fatal = run.fatal
        if fatal is not None and fatal is not e and isinstance(e, asyncio.CancelledError):
            # (a branch the caller ran itself was refused because another branch's interrupt
            # abandoned the fan-out: that interrupt is what the caller raises)
            del e
            raise fatal from None
        raise
    finally:
        if enclosing is not None:
            enclosing.discard(signal.stop)
        # (the fan-out is over: its signal, which branches left running still point to, must not
        # keep it — and every branch's state — alive in a reference cycle the collector has to find)
        signal.discard(run.stop)
    # (this frame goes into the traceback of what it raises, and the frames of a branch it ran itself
    # link back to it: it must not hold the fan-out, whose outcomes hold those errors)
    error = run.fatal or run.first_error
    if error is not None:
        interrupted = run.fatal is not None
        del run, work
        if interrupted:  # (a branch raised KeyboardInterrupt / SystemExit: stop as above)
            signal.abandon()
        try:
            raise error
        finally:
            del error  # (nor may it hold the error it raises)
    outcomes = run.outcomes
    del run, work
    note_failed_branches(outcomes)
    return outcomes


def note_failed_branches(outcomes: Sequence[BranchOutcome]) -> None:
    """A fan-out that goes on past failed branches (``collect`` / ``skip``) gives an output without
    them: a cache around it must not keep that output (see ``stageflow.stages.note_degraded``)."""
    for o in outcomes:
        if o.status == "error" or o.status == "timeout":
            note_degraded()
            return


def _wait(
    run: _SyncFanOut,
    ctx: contextvars.Context,
    pool: Any,
    n: int,
    timeout: float | None,
    on_error: str,
) -> bool:
    """Wait (and help, when starved) until the fan-out is finished; time branches out. ``True``
    when branches still running were abandoned at the end."""
    with run.cond:
        while not run.finished():
            if run.starved():
                # No worker has picked up this fan-out (the pool is busy, e.g. with the outer
                # branches of a nested fan-out waiting on this one): the caller runs a branch
                # itself, so the program always makes progress.
                run.cond.release()
                try:
                    took = run.pull_one(ctx)
                finally:
                    run.cond.acquire()
                if not took:
                    run.saturated = False  # (none left to take: wait for the running ones)
                continue
            wait: float | None = _STARVATION_CHECK
            if timeout is not None and run.running:
                now = perf_counter()
                oldest = min(run.running.values())
                wait = min(_STARVATION_CHECK, max(0.0, oldest + timeout - now))
                expired = [i for i, t in run.running.items() if now - t >= timeout]
                for i in expired:
                    o = run.outcomes[i]
                    o.status, o.elapsed = "timeout", now - run.running.pop(i)
                    run.timeouts += 1
                    run.abandoned.add(i)
                    o.error = BranchTimeoutError(i, timeout)
                    run.stop_branch(i)  # (what it started stops; the thread itself cannot)
                    note_abandoned()
                    logger.warning(
                        "stageflow: branch %d timed out after %ss; its thread cannot be cancelled "
                        "and was abandoned",
                        i,
                        timeout,
                    )
                    if on_error == "fail_fast" and run.first_error is None:
                        run.first_error, run.stopped = o.error, True
                    if not run.stopped and run.next < n:
                        pool.run_soon(run.pull, ctx)  # replace the stuck worker
                if expired:
                    continue
            run.cond.wait(wait)
        run.stopped = True
        abandoned = bool(run.running)
        for i in list(run.running):  # still running after fail_fast / until: abandoned
            run.abandoned.add(i)
            run.outcomes[i].status = "cancelled"
            # (what it started stops; the LM calls it would make are refused)
            run.stop_branch(i, "its fan-out ended early")
            note_abandoned()
        run.running.clear()
    return abandoned


async def afan_out(
    thunks: Sequence[Callable[[], Awaitable[Any]]],
    *,
    max_concurrency: int | None = None,
    on_error: FailurePolicy = "collect",
    timeout: float | None = None,
    until: Callable[[list[BranchOutcome]], bool] | None = None,
) -> list[BranchOutcome]:
    """Run async ``thunks`` concurrently as tasks; abandoned branches are cancelled."""
    _check_policy(on_error)
    n = len(thunks)
    if n == 0:
        return []
    run = _AsyncFanOut(thunks, max_concurrency, on_error, timeout, until)
    tasks, outcomes = run.tasks, run.outcomes
    create = asyncio.get_running_loop().create_task
    tasks.extend(create(run.one(i)) for i in range(n))
    try:
        await asyncio.gather(*tasks, return_exceptions=True)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        raise
    if run.interrupt or run.first_error:
        error = (run.interrupt or run.first_error)[0]
        # (the error's traceback keeps this frame: its locals must not lead back to the error)
        del run, tasks, outcomes
        try:
            raise error
        finally:
            del error
    note_failed_branches(outcomes)
    return outcomes


class _AsyncFanOut:
    """One :func:`afan_out` call's state. Its branches run :meth:`one`, a method rather than a
    closure: an error a fan-out keeps (``collect``, ``skip``) holds the branch's frame in its
    traceback, and a frame holds its function, so a closure over the outcomes led back to the error:
    a reference cycle per failed branch, the branch's state and all, until a full collection. The
    method drops its locals when it ends, for the same reason."""

    __slots__ = (
        "first_error",
        "gate",
        "interrupt",
        "on_error",
        "outcomes",
        "stopped",
        "tasks",
        "thunks",
        "timeout",
        "until",
    )

    def __init__(
        self,
        thunks: Sequence[Callable[[], Awaitable[Any]]],
        max_concurrency: int | None,
        on_error: str,
        timeout: float | None,
        until: Callable[[list[BranchOutcome]], bool] | None,
    ) -> None:
        n = len(thunks)
        self.thunks = thunks
        self.on_error = on_error
        self.timeout = timeout
        self.until = until
        self.outcomes = [BranchOutcome(i) for i in range(n)]
        self.gate = asyncio.Semaphore(max_concurrency) if max_concurrency and max_concurrency < n else None
        self.first_error: list[BaseException] = []
        #: A CancelledError, KeyboardInterrupt or SystemExit a branch raised.
        self.interrupt: list[BaseException] = []
        self.stopped = False
        self.tasks: list[asyncio.Task[None]] = []

    def stop(self, me: int) -> None:
        # Abandon every other branch: O(n) once, instead of re-waiting on all pending tasks.
        self.stopped = True
        for k, t in enumerate(self.tasks):
            if k != me and not t.done():
                t.cancel()

    async def one(self, i: int) -> None:
        o = self.outcomes[i]
        gate, timeout = self.gate, self.timeout
        if gate is not None:
            try:
                await gate.acquire()
            except BaseException:  # (cancelled while it waited: as at the end, below)
                del o, self
                raise
        try:
            if self.stopped:
                return  # never started: stays "skipped"
            t0 = perf_counter()
            try:
                if timeout is None:
                    o.value = await self.thunks[i]()
                else:
                    async with asyncio.timeout(timeout):
                        o.value = await self.thunks[i]()
            except TimeoutError as e:
                o.status = "timeout"
                o.error = BranchTimeoutError(i, timeout) if timeout is not None else e
            except asyncio.CancelledError as e:
                o.status, o.elapsed = "cancelled", perf_counter() - t0
                task = asyncio.current_task()
                left_alone = task is not None and task.cancelling() == 0
                del task  # (the task keeps this error, whose traceback keeps this frame)
                if left_alone and not self.interrupt:
                    # Nobody cancelled this task (neither ``stop`` nor an outer cancel reaching it
                    # through ``gather``): the branch itself raised CancelledError, e.g. leaked
                    # from an inner task. Like KeyboardInterrupt on the sync path it is never a
                    # branch failure: stop the siblings and re-raise it in the caller.
                    o.error = e
                    self.interrupt.append(e)
                    self.stop(i)
                raise
            except Exception as e:
                o.error, o.status = e, "error"
            except BaseException as e:  # KeyboardInterrupt, SystemExit, or another of yours
                # Never a branch failure: stop the siblings and re-raise it in the caller (on a loop
                # that survives it, gather would otherwise hand it back as this branch's result).
                o.error, o.status, o.elapsed = e, "cancelled", perf_counter() - t0
                self.interrupt.append(e)
                self.stop(i)
                raise
            else:
                o.ok, o.status = True, "ok"
            o.elapsed = perf_counter() - t0
            if self.stopped:
                return
            if not o.ok and self.on_error == "fail_fast":
                self.first_error.append(o.error)  # type: ignore[arg-type]
                self.stop(i)
            elif self.until is not None and self.until(self.outcomes):
                self.stop(i)
        finally:
            if gate is not None:
                gate.release()
            # (a kept error's traceback holds this frame: what its locals lead to must not lead
            # back to the error, the outcomes that keep it)
            del o, self
