"""The few values the engine reads on its hot path (kept apart so the engine imports nothing else
of :mod:`stageflow.budgets` until a budget is used)."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stageflow.budgets.ledger import BudgetLedger

__all__ = ["CHAIN", "GATES", "LIVE", "SKIP"]

#: The budgets in force, outermost first (carried into DSPy's worker threads by :mod:`.scope`).
CHAIN: ContextVar[tuple[BudgetLedger, ...]] = ContextVar("stageflow_lm_budgets", default=())
#: Budgets open in the process (LM calls are metered only while there is one, or a rate limit).
LIVE = [0]
#: Budgets open with a :class:`~stageflow.Degrade` (the engine asks :func:`.scope.stage_gate` only then).
GATES = [0]
#: What :func:`.scope.stage_gate` returns for a stage that is not run.
SKIP = object()
