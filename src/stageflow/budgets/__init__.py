"""Hard budgets and rate limits on LM work.

Two kinds of limit, not to be confused with the *concurrency* budget of :func:`stageflow.limits` /
``configure(max_concurrency=...)`` (:mod:`stageflow.engine.budget`: how many stages run at once):

- **LM budgets** (:class:`LMBudget`, :func:`budget`): how much LM work a block, a pipeline run
  (``pipeline.set_budget(...)``) or a stage call (``Stage(x, budget=...)``) may do in all — calls,
  tokens, cost, wall time. Each LM call reserves what it may use before it starts and settles after,
  so concurrent calls never overshoot; on exhaustion a call is refused with
  :class:`~stageflow.BudgetExceeded`, or a declared :class:`Degrade` (a cheaper LM, fewer ensemble
  members, skipped stages) takes over first. See :mod:`.ledger` and :mod:`.scope`.
- **Rate limits** (:func:`rate_limit`): requests and tokens per minute for one model, shared by the
  whole process, honouring ``Retry-After``. See :mod:`.ratelimit`.

Both reach every LM call through one wrapper around DSPy's LM execution (:mod:`.intercept`),
installed the first time either is used; idle, it costs one check per LM call.
"""

from stageflow.budgets.ledger import BudgetLedger
from stageflow.budgets.ratelimit import RateLimiter, rate_limit, rate_limits
from stageflow.budgets.scope import budget
from stageflow.budgets.spec import DEFAULT_MAX_TOKENS, Degrade, LMBudget
from stageflow.errors import BudgetExceeded

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "BudgetExceeded",
    "BudgetLedger",
    "Degrade",
    "LMBudget",
    "RateLimiter",
    "budget",
    "rate_limit",
    "rate_limits",
]
