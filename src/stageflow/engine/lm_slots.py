"""The concurrency cap of ``stageflow.limits`` / ``stageflow.configure`` on LM calls too.

A cap set with ``stageflow.limits(max_concurrency=N)`` or ``stageflow.configure(max_concurrency=N)``
limits two things, each to ``N`` at once:

- **leaf stage calls** (:mod:`stageflow.engine.budget`), as before;
- **LM calls**, wherever they are made inside the block: by a predictor stage, or by a custom
  module stage that fans out by itself (``dspy.Parallel``, threads of its own), or by DSPy code
  outside any stage (``dspy.Parallel``, ``dspy.Evaluate``), as long as the call runs in the block's
  context (DSPy's worker threads carry it).

LM calls take slots of a *separate* semaphore per cap (its companion), never of the stage slots:
a stage holding a stage slot while its inner LM calls wait for LM slots cannot deadlock, because
an LM call holds its slot only for the call itself and waits for nothing else meanwhile. An LM
call made inside another one (an LM wrapper that calls a model, in its thread or in the worker
threads of a ``dspy.Parallel`` it runs) does not take a second slot of a cap its outer call holds
one of; a cap opened inside the outer call (``stageflow.limits`` in an LM's ``forward``) caps it. A
fan-out's own ``max_concurrency`` (``ForEach(max_concurrency=...)``) caps its stages only.

The slots are taken around DSPy's ``execute``/``aexecute``, the function every LM call runs
through (:mod:`stageflow.budgets.intercept`, installed the first time a cap is used).
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from stageflow.engine.budget import LM_CAPS, Budget, visible_chain

__all__ = ["acall_capped", "call_capped", "ensure_installed", "lm_budget", "lm_caps", "lm_slots"]

T = TypeVar("T")

#: Budgets whose cap also holds for LM calls (a fan-out's own cap does not).
_CAPPING = frozenset({"limits", "global"})
_COMPANIONS: weakref.WeakKeyDictionary[Budget, Budget] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
_IN_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("stageflow_in_lm_call", default=False)


def lm_slots() -> tuple[Budget, ...]:
    """The LM-call semaphores an LM call made here takes (empty when no cap is in force)."""
    if not LM_CAPS[0] or _IN_CALL.get():
        return ()
    return lm_caps()


def lm_caps() -> tuple[Budget, ...]:
    """The LM-call semaphores of every cap in force here, whether or not an LM call made here holds
    one already (an LM call made inside another takes those its outer call does not hold)."""
    if not LM_CAPS[0]:
        return ()
    chain = visible_chain()  # in a DSPy worker thread: the caps of the block that started it
    if not chain:
        return ()
    out: list[Budget] = []
    for budget in chain:
        if budget.name not in _CAPPING:
            continue
        companion = _COMPANIONS.get(budget)
        if companion is None:
            with _LOCK:
                companion = _COMPANIONS.get(budget)
                if companion is None:
                    companion = Budget(budget.limit, f"{budget.name} (LM calls)")
                    _COMPANIONS[budget] = companion
        out.append(companion)
    return tuple(out)


def lm_budget(budget: Budget) -> Budget | None:
    """The LM-call semaphore of ``budget`` (its ``peak`` is the most LM calls that ran at once),
    ``None`` before any LM call took a slot of it."""
    return _COMPANIONS.get(budget)


def call_capped(slots: tuple[Budget, ...], fn: Callable[[], T]) -> T:
    """Run ``fn`` holding a slot of each of ``slots`` (outermost first)."""
    taken: list[Budget] = []
    try:
        for b in slots:
            b.acquire()
            taken.append(b)
        token = _IN_CALL.set(True)
        try:
            return fn()
        finally:
            _IN_CALL.reset(token)
    finally:
        for b in reversed(taken):
            b.release()


async def acall_capped(slots: tuple[Budget, ...], fn: Callable[[], Awaitable[T]]) -> T:
    """:func:`call_capped` for async calls (waiting suspends the task, not the thread)."""
    taken: list[Budget] = []
    try:
        for b in slots:
            await b.aacquire()
            taken.append(b)
        token = _IN_CALL.set(True)
        try:
            return await fn()
        finally:
            _IN_CALL.reset(token)
    finally:
        for b in reversed(taken):
            b.release()


_INTERCEPT: list[Any] = []  # stageflow.budgets.intercept, once imported (it imports this module)


def ensure_installed() -> None:
    """Wrap DSPy's LM execution (once) so that LM calls take their slots, budgets and rate limits
    hold, and stageflow's usage accounting sees each call's result (the first pipeline call does
    it); after the first call, one check."""
    if not _INTERCEPT:
        from stageflow.budgets import intercept

        _INTERCEPT.append(intercept)
    intercept = _INTERCEPT[0]
    if not intercept.installed():
        intercept.install()
