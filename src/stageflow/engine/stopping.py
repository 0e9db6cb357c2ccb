"""Stopping work its caller gave up on: a stop signal per fan-out (and per abandonable call), and
the enclosing one of the work running here, which the fan-outs and event-loop calls started inside
register with. A sync thread cannot be interrupted, so stopping a fan-out starts no more of its
branches, and an event-loop call is cancelled; a caller that abandons work (a timeout, fail_fast,
Ctrl-C) stops what that work started, at every level of nesting.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

__all__ = [
    "StopSignal",
    "abandonable",
    "enclosing_fan_out",
    "refuse_if_abandoned",
    "run_as_callers",
    "run_under",
    "start_as_callers",
]


#: One lock for every signal (registering and stopping are short; a signal is made per call that
#: may be abandoned, so it holds no lock of its own).
_LOCK = threading.Lock()


class StopSignal:
    """A request to stop a fan-out that runs on another thread, whether it comes before or after
    the fan-out has started: pass :meth:`register` as :func:`fan_out`'s ``on_start``; :meth:`stop`
    stops it now, or as soon as it starts (then no branch starts at all).

    Example:
        >>> signal = StopSignal()
        >>> signal.stop()  # the caller gave up before the fan-out began
        >>> from stageflow.engine.fanout import fan_out
        >>> fan_out([lambda: 1, lambda: 2], on_start=signal.register)[0].status
        'skipped'
    """

    __slots__ = ("_stopped", "_stops", "abandoned", "parent", "reason")

    def __init__(self, parent: StopSignal | None = None) -> None:
        self._stopped = False
        self._stops: list[Callable[[], None]] = []
        #: The enclosing signal when this one was made (see :meth:`gave_up`).
        self.parent = parent
        #: Set by :meth:`abandon`: the caller gave up on the work this signal stands for.
        self.abandoned = False
        #: Why (for the refusal's message), once abandoned.
        self.reason = ""

    def register(self, stop: Callable[[], None]) -> None:
        """Keep ``stop`` (a fan-out's stopper); call it at once when :meth:`stop` came first."""
        with _LOCK:
            if not self._stopped:
                self._stops.append(stop)
                return
        stop()

    def discard(self, stop: Callable[[], None]) -> None:
        """Forget ``stop`` (its fan-out has finished)."""
        with _LOCK, contextlib.suppress(ValueError):
            self._stops.remove(stop)

    def stop(self) -> None:
        """Stop every fan-out registered, and any registered later."""
        with _LOCK:
            self._stopped = True
            stops, self._stops = self._stops, []
        for stop in stops:
            stop()

    def abandon(self, reason: str = "its caller gave up") -> None:
        """The caller gave up on this work (``reason``: its timeout passed, its fan-out ended early):
        stop what it started, and refuse the LM calls it would make from now on
        (:func:`refuse_if_abandoned`)."""
        if not self.abandoned:
            self.reason = reason
        self.abandoned = True
        self.stop()

    def gave_up(self) -> bool:
        """Whether the work this signal stands for, or work around it, was abandoned.

        >>> outer = StopSignal(); inner = StopSignal(parent=outer)
        >>> outer.abandon(); inner.gave_up()
        True
        """
        return self.abandoned_by() is not None

    def abandoned_by(self) -> str | None:
        """Why the work this signal stands for (or work around it) was abandoned; ``None`` if it
        was not."""
        signal: StopSignal | None = self
        while signal is not None:
            if signal.abandoned:
                return signal.reason or "its caller gave up"
            signal = signal.parent
        return None


#: The stop signal of the thread fan-out whose branch is running: a fan-out started inside that
#: branch registers with it, so a fan-out stopped because its caller gave up (cancelled, Ctrl-C)
#: stops the fan-outs nested in its running branches too.
_ENCLOSING: contextvars.ContextVar[StopSignal | None] = contextvars.ContextVar(
    "stageflow_enclosing_fan_out", default=None
)


def enclosing_fan_out() -> StopSignal | None:
    """The stop signal of the thread fan-out whose branch is running here, if any (work started
    here that is not a thread fan-out registers with it to be stopped with it). In a worker thread
    of DSPy's (``dspy.Parallel``, ``Module.batch``, ``dspy.Evaluate``), which copies DSPy's settings
    but not the context, the signal of the abandonable call that started it (see
    :func:`abandonable`)."""
    signal = _ENCLOSING.get()
    if signal is None:
        settings = sys.modules.get("dspy.dsp.utils.settings")
        if settings is not None:
            signal = settings.thread_local_overrides.get().get(_OVERRIDE_KEY)
    return signal


#: Where :func:`abandonable` leaves its signal in DSPy's settings overrides.
_OVERRIDE_KEY = "stageflow_abandonable"


def _publish_here(signal: StopSignal) -> None:
    """Put ``signal`` in DSPy's settings overrides here (DSPy copies them into the worker threads it
    starts, where :func:`enclosing_fan_out` finds it)."""
    settings = sys.modules.get("dspy.dsp.utils.settings")
    if settings is not None:  # (no DSPy thread can start before DSPy is imported)
        overrides = settings.thread_local_overrides
        new = settings.dotdict(overrides.get())
        new[_OVERRIDE_KEY] = signal
        overrides.set(new)


def run_under(ctx: contextvars.Context, signal: StopSignal) -> None:
    """Make ``signal`` the enclosing one of the work to run in ``ctx``, in DSPy's worker threads too
    (``dspy.Parallel``, ``Module.batch`` started there copy DSPy's settings, not the context): the
    LM calls they would make once it is abandoned are refused as well.

    >>> import contextvars
    >>> ctx = contextvars.copy_context(); signal = StopSignal()
    >>> run_under(ctx, signal); ctx.run(enclosing_fan_out) is signal
    True
    """
    ctx.run(_enter, signal)


def _enter(signal: StopSignal) -> None:
    """(in the context to run under ``signal``: see :func:`run_under`)"""
    _ENCLOSING.set(signal)
    _publish_here(signal)


@contextlib.contextmanager
def abandonable(ctx: contextvars.Context) -> Iterator[StopSignal]:
    """Work about to run in ``ctx`` that its caller may abandon (a stage's timeout): it gets a stop
    signal of its own, the enclosing one inside ``ctx``, so the fan-outs and event-loop calls it
    starts stop when the caller gives up on it (call :meth:`StopSignal.stop` then). The signal is
    stopped with the enclosing fan-out too, while the block runs.

    Example:
        >>> import contextvars
        >>> ctx = contextvars.copy_context()
        >>> with abandonable(ctx) as signal:
        ...     ctx.run(enclosing_fan_out) is signal
        True
    """
    enclosing = enclosing_fan_out()
    signal = StopSignal(enclosing)
    if enclosing is not None:
        enclosing.register(signal.stop)
    run_under(ctx, signal)
    try:
        yield signal
    finally:
        if enclosing is not None:
            enclosing.discard(signal.stop)


def refuse_if_abandoned() -> None:
    """Raise ``asyncio.CancelledError`` when the work running here was abandoned (see
    :meth:`StopSignal.abandon`): an LM call it is about to make would be answered and billed for
    nobody. Called before every LM call is sent, and again after it waited for a rate limit or a
    budget. (A fan-out stopped early by ``fail_fast`` or ``until`` abandons the branches it leaves
    running, not those that finished: a lazy result of theirs may still be resolved later.)

    >>> refuse_if_abandoned()  # (nothing abandoned here)
    """
    signal = enclosing_fan_out()
    if signal is not None:
        reason = signal.abandoned_by()
        if reason is not None:
            raise asyncio.CancelledError(
                f"stageflow: the caller gave up on this work ({reason}); its LM call was not sent"
            )


def run_as_callers(ctx: contextvars.Context, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in (a copy of) ``ctx``, a context captured earlier, as work of the caller
    here: its enclosing stop signal is this caller's, not the one captured with ``ctx``. Work a
    branch deferred (a lazy result) and someone forces later belongs to whoever forces it, so a
    branch abandoned since does not refuse it.

    >>> import contextvars
    >>> abandoned = StopSignal(); abandoned.abandon()
    >>> ctx = contextvars.copy_context(); _ = ctx.run(_ENCLOSING.set, abandoned)
    >>> run_as_callers(ctx, enclosing_fan_out) is abandoned
    False
    """
    return _as_callers(ctx).run(fn, *args)


def _as_callers(ctx: contextvars.Context) -> contextvars.Context:
    """A copy of ``ctx`` whose enclosing stop signal is this caller's (a fresh one when none)."""
    here = enclosing_fan_out()
    run = ctx.copy()
    run_under(run, StopSignal() if here is None else here)
    return run


def start_as_callers(
    ctx: contextvars.Context, fn: Callable[..., Awaitable[T]], *args: Any
) -> asyncio.Task[T]:
    """Async twin of :func:`run_as_callers`: ``fn(*args)`` started as a task in (a copy of) ``ctx``,
    with this caller's stop signal. Awaiting it cancels it with the caller; the task is returned so
    a caller cancelled just as it ended can still take its outcome.

    >>> import asyncio, contextvars
    >>> abandoned = StopSignal(); abandoned.abandon()
    >>> ctx = contextvars.copy_context(); _ = ctx.run(_ENCLOSING.set, abandoned)
    >>> async def enclosing() -> StopSignal | None:
    ...     return enclosing_fan_out()
    >>> async def main() -> bool:
    ...     return await start_as_callers(ctx, enclosing) is abandoned
    >>> asyncio.run(main())
    False
    """
    return asyncio.get_running_loop().create_task(_awaited(fn, args), context=_as_callers(ctx))


async def _awaited(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
    return await fn(*args)
