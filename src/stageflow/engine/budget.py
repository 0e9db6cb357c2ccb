"""The concurrency budget: caps on concurrent leaf stage calls, inherited by nested fan-outs.

``stageflow.configure(max_concurrency=N)`` (or ``with stageflow.limits(...)``) sets a cap; each
fan-out may add its own. Caps form a chain through the context, and a leaf call takes one slot of
every budget in its chain, outermost first. A leaf running inside another leaf (a function stage
that calls a pipeline) does not take a slot twice, so small caps cannot deadlock.

Not to be confused with *LM budgets* (:func:`stageflow.budget`, :class:`stageflow.LMBudget`,
:mod:`stageflow.budgets`): those cap how much LM work is done in all (calls, tokens, cost, time);
this caps how many stage calls run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

from stageflow.engine.carry import carried, publish
from stageflow.engine.config import check_options, on_change
from stageflow.errors import ConfigurationError

__all__ = [
    "Budget",
    "aenter_leaf",
    "budget_chain",
    "child_budget",
    "enter_leaf",
    "exit_leaf",
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

_ROOT: list[Budget | None] = [None]
_BUDGETS: contextvars.ContextVar[tuple[Budget, ...] | None] = carried(
    contextvars.ContextVar("stageflow_budgets", default=None)
)
_HELD: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("stageflow_held", default=frozenset())


def _on_config(name: str, value: Any) -> None:
    if name == "max_concurrency":
        _ROOT[0] = None if value is None else Budget(value, "global")


on_change(_on_config)


def budget_chain() -> tuple[Budget, ...]:
    """The budgets in force here, outermost first."""
    chain = _BUDGETS.get()
    if chain is None:
        root = _ROOT[0]
        return (root,) if root is not None else ()
    return chain


@contextlib.contextmanager
def limits(max_concurrency: int | None = None, **options: Any) -> Iterator[Budget | None]:
    """Cap concurrent leaf stage calls inside the block (nested under any cap already active)."""
    check_options(
        {"max_concurrency": max_concurrency, **options}, "stageflow.limits", frozenset({"max_concurrency"})
    )
    if max_concurrency is None:
        yield None
        return
    budget = Budget(max_concurrency, "limits")
    token = _BUDGETS.set((*budget_chain(), budget))
    try:
        with publish():  # the cap holds in DSPy's worker threads too (dspy.Evaluate, dspy.Parallel)
            yield budget
    finally:
        _BUDGETS.reset(token)


@contextlib.contextmanager
def child_budget(max_concurrency: int | None, name: str) -> Iterator[None]:
    """Add a fan-out's own cap to the chain for the branches it starts."""
    if max_concurrency is None:
        yield
        return
    token = _BUDGETS.set((*budget_chain(), Budget(max_concurrency, name)))
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
