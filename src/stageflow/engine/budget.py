"""The concurrency budget: caps on concurrent leaf stage calls, inherited by nested fan-outs.

``stageflow.configure(max_concurrency=N)`` (or ``with stageflow.limits(...)``) sets a cap; each
fan-out may add its own. Caps form a chain through the context, and a leaf call takes one slot of
every budget in its chain, outermost first. A leaf running inside another leaf (a function stage
that calls a pipeline) does not take a slot twice, so small caps cannot deadlock.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from stageflow.errors import ConfigurationError

__all__ = [
    "Budget",
    "aenter_leaf",
    "child_budget",
    "configure",
    "enter_leaf",
    "exit_leaf",
    "get_config",
    "leaf_slots",
    "limits",
]


class Budget:
    """A counting semaphore usable from threads and from asyncio tasks alike.

    ``peak`` records the highest number of slots held at once (tests assert it).
    """

    def __init__(self, limit: int, name: str = "") -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ConfigurationError(
                f"max_concurrency must be a positive int, got {limit!r}.",
                field="max_concurrency",
                code="bad_option",
                hint="pass max_concurrency=None for no cap",
            )
        self.limit = limit
        self.name = name
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()
        self._waiters: deque[Any] = deque()

    def __deepcopy__(self, memo: dict[int, Any]) -> Budget:
        return self

    def _take(self) -> None:
        self.used += 1
        if self.used > self.peak:
            self.peak = self.used

    def acquire(self) -> None:
        """Take a slot, blocking the thread until one is free."""
        with self._lock:
            if self.used < self.limit and not self._waiters:
                self._take()
                return
            event = threading.Event()
            self._waiters.append(event)
        event.wait()  # release() hands the slot over before setting the event

    async def aacquire(self) -> None:
        """Take a slot, suspending the task until one is free."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.used < self.limit and not self._waiters:
                self._take()
                return
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            await fut
        except asyncio.CancelledError:
            with self._lock:
                handed = fut.done() and not fut.cancelled()
                with contextlib.suppress(ValueError):
                    self._waiters.remove((loop, fut))
            if handed:
                self.release()
            raise

    def release(self) -> None:
        """Free a slot, handing it to the longest waiter if there is one."""
        with self._lock:
            while self._waiters:
                waiter = self._waiters.popleft()
                if isinstance(waiter, threading.Event):
                    waiter.set()
                    return
                loop, fut = waiter
                if fut.done():
                    continue
                loop.call_soon_threadsafe(_hand_over, fut, self)
                return
            self.used -= 1


def _hand_over(fut: asyncio.Future[None], budget: Budget) -> None:
    if fut.done():  # cancelled meanwhile: pass the slot on
        budget.release()
    else:
        fut.set_result(None)


# -- configuration -------------------------------------------------------------------------------

_OPTIONS = {"max_concurrency", "max_threads"}


@dataclass
class _Config:
    max_concurrency: int | None = None
    max_threads: int = 512


_CONFIG = _Config()
_ROOT: list[Budget | None] = [None]
_BUDGETS: contextvars.ContextVar[tuple[Budget, ...] | None] = contextvars.ContextVar(
    "stageflow_budgets", default=None
)
_HELD: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("stageflow_held", default=frozenset())


def _check_options(options: dict[str, Any], where: str) -> None:
    unknown = sorted(set(options) - _OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown option(s) {unknown}. Known options: {sorted(_OPTIONS)}.",
            field=unknown[0],
            code="unknown_option",
        )


def configure(**options: Any) -> None:
    """Set process-wide defaults: ``max_concurrency`` (cap on concurrent leaf stage calls in
    stageflow's fan-outs; ``None`` = no cap) and ``max_threads`` (size of the shared thread pool).

    An unknown option raises :class:`ConfigurationError`; it is never silently ignored.
    """
    _check_options(options, "stageflow.configure")
    if "max_concurrency" in options:
        cap = options["max_concurrency"]
        _ROOT[0] = None if cap is None else Budget(cap, "global")
        _CONFIG.max_concurrency = cap
    if "max_threads" in options:
        n = options["max_threads"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigurationError(
                f"max_threads must be a positive int, got {n!r}.", field="max_threads", code="bad_option"
            )
        _CONFIG.max_threads = n
        from stageflow.engine.pool import _reset_pool

        _reset_pool()


def get_config() -> dict[str, Any]:
    """The current process-wide options."""
    return {"max_concurrency": _CONFIG.max_concurrency, "max_threads": _CONFIG.max_threads}


def _chain() -> tuple[Budget, ...]:
    chain = _BUDGETS.get()
    if chain is None:
        root = _ROOT[0]
        return (root,) if root is not None else ()
    return chain


@contextlib.contextmanager
def limits(max_concurrency: int | None = None, **options: Any) -> Iterator[Budget | None]:
    """Cap concurrent leaf stage calls inside the block (nested under any cap already active)."""
    _check_options({"max_concurrency": max_concurrency, **options}, "stageflow.limits")
    if max_concurrency is None:
        yield None
        return
    budget = Budget(max_concurrency, "limits")
    token = _BUDGETS.set((*_chain(), budget))
    try:
        yield budget
    finally:
        _BUDGETS.reset(token)


@contextlib.contextmanager
def child_budget(max_concurrency: int | None, name: str) -> Iterator[None]:
    """Add a fan-out's own cap to the chain for the branches it starts."""
    if max_concurrency is None:
        yield
        return
    token = _BUDGETS.set((*_chain(), Budget(max_concurrency, name)))
    try:
        yield
    finally:
        _BUDGETS.reset(token)


def leaf_slots() -> tuple[Budget, ...]:
    """Budgets a leaf call must take a slot of here (empty on the unlimited fast path)."""
    chain = _BUDGETS.get()
    if chain is None:
        root = _ROOT[0]
        if root is None:
            return ()
        chain = (root,)
    if not chain:
        return ()
    held = _HELD.get()
    return tuple(b for b in chain if id(b) not in held)


def enter_leaf(budgets: tuple[Budget, ...]) -> contextvars.Token[frozenset[int]]:
    for b in budgets:
        b.acquire()
    return _HELD.set(_HELD.get() | {id(b) for b in budgets})


async def aenter_leaf(budgets: tuple[Budget, ...]) -> contextvars.Token[frozenset[int]]:
    taken: list[Budget] = []
    try:
        for b in budgets:
            await b.aacquire()
            taken.append(b)
    except BaseException:
        for b in reversed(taken):
            b.release()
        raise
    return _HELD.set(_HELD.get() | {id(b) for b in budgets})


def exit_leaf(budgets: tuple[Budget, ...], token: contextvars.Token[frozenset[int]]) -> None:
    _HELD.reset(token)
    for b in reversed(budgets):
        b.release()
