"""Which budgets are in force: ``stageflow.budget()``, run and stage budgets, and the engine's gates.

The budgets an LM call runs inside form a chain in a context variable, outermost first: the
``with stageflow.budget(...)`` blocks around it, the run budget of each pipeline call
(``pipeline.set_budget(...)``) and the budget of each stage call (``Stage(x, budget=...)``). The chain
is carried into DSPy's worker threads (``dspy.Evaluate``, ``dspy.Parallel``) like the rest of
stageflow's context (:mod:`stageflow.engine.carry`), so a budget holds there too, inside a pipeline or
not.

The engine asks this module two things, and only while a budget with a :class:`Degrade` is open
(otherwise it never calls in, so unbudgeted runs pay nothing): whether a stage about to start is
skipped or runs on a cheaper LM (:func:`stage_gate`), and how many ensemble members to start
(:func:`members_allowed`).
"""

from __future__ import annotations

import contextlib
import functools
import re
import sys
import threading
from collections.abc import Iterator
from contextvars import Token
from typing import Any

from stageflow.budgets._state import CHAIN, GATES, LIVE, SKIP
from stageflow.budgets.ledger import BudgetLedger
from stageflow.budgets.spec import LMBudget, as_budget
from stageflow.engine.carry import carried, publish
from stageflow.stages import note_degraded
from stageflow.usage import run_events

__all__ = [
    "active_chain",
    "budget",
    "enter_budget",
    "exit_budget",
    "lm_swapped",
    "members_allowed",
    "record_event",
    "stage_gate",
]

_CHAIN = carried(CHAIN)
_COUNT = threading.Lock()
_SNAPSHOT_KEY = "stageflow_context"  # where engine.carry publishes the carried variables for DSPy


def active_chain() -> tuple[BudgetLedger, ...]:
    """The budgets in force here, outermost first (also in a DSPy worker thread no pipeline call
    has adopted stageflow's context in)."""
    chain = _CHAIN.get()
    if chain:
        return chain if not chain[-1].closed else tuple(ledger for ledger in chain if not ledger.closed)
    settings_module = sys.modules.get("dspy.dsp.utils.settings")
    if settings_module is None:
        return ()
    snapshot = settings_module.thread_local_overrides.get().get(_SNAPSHOT_KEY)
    found = snapshot.get(_CHAIN) if isinstance(snapshot, dict) else None
    return tuple(ledger for ledger in found if not ledger.closed) if isinstance(found, tuple) else ()


def enter_budget(limits: LMBudget, scope: str) -> tuple[BudgetLedger, Token[tuple[BudgetLedger, ...]], Any]:
    """Open a ledger for ``limits`` inside the budgets in force; :func:`exit_budget` closes it."""
    from stageflow.budgets.intercept import install

    install()
    ledger = BudgetLedger(limits, scope)
    token = _CHAIN.set((*active_chain(), ledger))
    with _COUNT:
        LIVE[0] += 1
        if limits.degrade is not None:
            GATES[0] += 1
    published = publish()  # the chain reaches DSPy's worker threads started inside
    published.__enter__()
    return ledger, token, published


def exit_budget(opened: tuple[BudgetLedger, Token[tuple[BudgetLedger, ...]], Any]) -> None:
    """Close what :func:`enter_budget` opened (in the same context)."""
    ledger, token, published = opened
    ledger.closed = True
    published.__exit__(None, None, None)
    _CHAIN.reset(token)
    with _COUNT:
        LIVE[0] -= 1
        if ledger.limits.degrade is not None:
            GATES[0] -= 1


@contextlib.contextmanager
def budget(limits: LMBudget | dict[str, Any] | None = None, /, **options: Any) -> Iterator[BudgetLedger]:
    """Hard limits on every LM call made inside the block, wherever it runs.

    Takes an :class:`~stageflow.LMBudget` or its fields as keywords (``max_calls``, ``max_tokens``,
    ``max_cost``, ``max_seconds``, ``default_max_tokens``, ``degrade``, ``clock``); with none, it
    only accounts. Yields the :class:`~stageflow.BudgetLedger` (what was spent, live). Budgets nest: a
    call must fit in every block around it. Sync and async code, threads that copy the context, and
    DSPy's worker threads (``dspy.Evaluate``, ``dspy.Parallel``) inside the block are all held to it;
    so is a bare ``dspy.Predict`` called outside any pipeline. Not to be confused with
    :func:`stageflow.limits` (how many stages run at once).

    Examples:
        >>> import dspy, stageflow
        >>> from stageflow.testing import FakeLM
        >>> qa = dspy.Predict("question -> answer")
        >>> with dspy.context(lm=FakeLM()), stageflow.budget(max_calls=1) as spent:
        ...     _ = qa(question="one")
        ...     qa(question="two")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        stageflow.errors.BudgetExceeded: An LM call was refused: stageflow.budget() has spent ...
        >>> spent.calls
        1
    """
    spec = as_budget(limits, "stageflow.budget", options) or LMBudget()
    opened = enter_budget(spec, "stageflow.budget()")
    try:
        yield opened[0]
    finally:
        exit_budget(opened)


def record_event(
    ledger: BudgetLedger,
    kind: str,
    *,
    stage: str | None = None,
    events: list[Any] | None = None,
    **detail: Any,
) -> None:
    """Record what a budget did in its ledger and in the run's events (``result.run.events``).

    ``stage`` / ``events`` default to the stage and run of the pipeline call running here.
    """
    from stageflow.policies.recovery import PolicyEvent

    if events is None or stage is None:
        found, path = run_events()
        events = found if events is None else events
        stage = path if stage is None else stage
    event = PolicyEvent(stage, kind, detail={"budget": ledger.scope, **detail})
    ledger.events.append(event)
    if events is not None:
        events.append(event)


def _degraded(stage: str, events: list[Any] | None) -> list[BudgetLedger]:
    """The budgets in force here whose degradation applies, innermost first (recording each newly
    crossed one)."""
    found = []
    for ledger in reversed(active_chain()):
        if ledger.limits.degrade is None:
            continue
        if ledger.check_degraded():
            record_event(ledger, "budget_degraded", stage=stage, events=events, **_degrade_detail(ledger))
        if ledger.degraded:
            found.append(ledger)
    return found


def _degrade_detail(ledger: BudgetLedger) -> dict[str, Any]:
    assert ledger.limits.degrade is not None
    return {**ledger.limits.degrade.describe(), "spent": ledger.to_dict()}


@functools.lru_cache(maxsize=256)
def _pattern(path: str) -> re.Pattern[str]:
    """A stage path where ``*`` matches anything (brackets and quotes are literal)."""
    return re.compile(".*".join(re.escape(part) for part in path.split("*")))


def stage_gate(stage: str, events: list[Any]) -> Any:
    """For a stage (full path) about to start: :data:`SKIP`, a cheaper LM to run it on, or ``None``."""
    lm = None
    for ledger in _degraded(stage, events):
        degrade = ledger.limits.degrade
        assert degrade is not None
        if any(_pattern(p).fullmatch(stage) for p in degrade.skip):
            record_event(ledger, "budget_skipped", stage=stage, events=events, share=round(ledger.share(), 4))
            note_degraded()  # (a cache around this call keeps none of it: not the full answer)
            return SKIP
        if lm is None and degrade.lm is not None:
            lm = degrade.lm
    if lm is not None:
        note_degraded()
    return lm


def members_allowed(count: int, stage: str, events: list[Any]) -> int:
    """How many of an ensemble's ``count`` members to start (all of them unless a degraded budget
    says fewer; the trimming is recorded)."""
    if not GATES[0]:
        return count
    allowed = count
    for ledger in _degraded(stage, events):
        limit = ledger.limits.degrade.max_members if ledger.limits.degrade is not None else None
        if limit is not None and limit < allowed:
            allowed = limit
            record_event(ledger, "budget_members", stage=stage, events=events, ran=limit, of=count)
    if allowed < count:
        note_degraded()
    return allowed


@contextlib.contextmanager
def lm_swapped(lm: Any) -> Iterator[None]:
    """Predictors inside the block that use the configured LM use ``lm`` instead."""
    import dspy

    with dspy.context(lm=lm):
        yield
