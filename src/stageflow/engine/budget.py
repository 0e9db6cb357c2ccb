"""The concurrency budget: caps on concurrent leaf stage calls, inherited by nested fan-outs (the
caps of ``stageflow.limits`` / ``configure`` hold for LM calls too: :mod:`stageflow.engine.lm_slots`).

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
import sys
import threading
from collections import deque
from collections.abc import Iterator
from typing import Any

from stageflow.engine.carry import carried, publish, visible
from stageflow.engine.config import check_options, on_change
from stageflow.errors import ConfigurationError

__all__ = [
    "LM_CAPS",
    "Budget",
    "aenter_leaf",
    "budget_chain",
    "child_budget",
    "enter_leaf",
    "exit_leaf",
    "leaf_slots",
    "limits",
    "visible_chain",
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


#: Whether a cap that holds for LM calls too (``stageflow.limits``, ``configure(max_concurrency=)``)
#: was ever made in this process: until one is, no LM call has a slot to take.
LM_CAPS: list[bool] = [False]


def _on_config(name: str, value: Any) -> None:
    if name == "max_concurrency":
        if value is not None:
            LM_CAPS[0] = True
        _ROOT[0] = None if value is None else Budget(value, "global")
        if value is not None and "dspy" in sys.modules:  # else the first capped stage call does it
            _cap_lm_calls()


def _cap_lm_calls() -> None:
    """Make the cap hold for LM calls too (:mod:`stageflow.engine.lm_slots`)."""
    from stageflow.engine.lm_slots import ensure_installed

    ensure_installed()


on_change(_on_config)


def budget_chain() -> tuple[Budget, ...]:
    """The budgets in force here, outermost first."""
    chain = _BUDGETS.get()
    if chain is None:
        root = _ROOT[0]
        return (root,) if root is not None else ()
    return chain


def visible_chain() -> tuple[Budget, ...]:
    """:func:`budget_chain`, or in a DSPy worker thread that no pipeline call adopted the context
    of yet, the chain of the block that started it (:func:`stageflow.engine.carry.visible`)."""
    carried_chain = visible(_BUDGETS)
    return budget_chain() if carried_chain is None else carried_chain


@contextlib.contextmanager
def limits(max_concurrency: int | None = None, **options: Any) -> Iterator[Budget | None]:
    """Cap concurrent leaf stage calls, and concurrent LM calls, inside the block (nested under any
    cap already active).

    Two counts are each held to ``max_concurrency``: leaf stage calls (a predictor, a function, a
    custom module used as a stage), and LM calls made anywhere in the block — including those a
    custom module stage makes through ``dspy.Parallel`` or threads of its own, and those of DSPy
    code outside any stage (``dspy.Parallel``, ``dspy.Evaluate``), whose worker threads carry the
    cap. LM calls take slots of their own, so a stage waiting for its inner LM calls never blocks
    them (:mod:`stageflow.engine.lm_slots`). Work a stage does in threads it starts without copying
    the context (a bare ``threading.Thread``) is not capped; neither is anything that is not an LM
    call (a retriever, an HTTP request).

    Examples:
        >>> import stageflow
        >>> p = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x + 1}, writes=["y"])])
        >>> with stageflow.limits(max_concurrency=2) as budget:
        ...     _ = p(x=1)
        >>> budget.limit, budget.peak
        (2, 1)
    """
    check_options(
        {"max_concurrency": max_concurrency, **options}, "stageflow.limits", frozenset({"max_concurrency"})
    )
    if max_concurrency is None:
        yield None
        return
    LM_CAPS[0] = True
    budget = Budget(max_concurrency, "limits")
    _cap_lm_calls()
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
