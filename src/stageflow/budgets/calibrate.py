"""What a budget reserves for an LM call, and what it learns from the calls that settle.

A call's :class:`Need` is what it may use as read from the call (:mod:`.sizing`): calls, tokens, and
whether those tokens and a cost are true upper bounds. Each budget turns it into a :class:`Hold`
with what it has learned about the model (:class:`Knowledge`):

- **Known bound** (``max_tokens`` the provider enforces; a price from DSPy's table): the hold is
  that bound, and concurrent calls cannot overshoot.
- **No bound** (no ``max_tokens``, a custom engine that may ignore it, a model with no known price)
  and nothing learned yet about the model: the call is a *probe* — while a probe is in flight, no
  other unbounded call of an unlearned model starts against that budget, so before anything is known
  a budget can be overshot by at most one call (with the calls made inside it: a router LM's probe
  does not hold back the calls it makes, which could never start otherwise).
- **Learned**: once a call of the model has settled, later calls hold their token reservation ×
  the largest overrun seen (what a call reported ÷ what it reserved, never below 1; and once the
  model has overrun, at least the fewest tokens any of its calls used), and cost: tokens held × the
  highest cost per token seen (per the larger of what was held and what was used), at least the
  cheapest call seen — so a call like the ones before holds at least what they cost.

A response that reports more than its hold is charged in full: the budget refuses every later call
once it is crossed, and it can have been overshot by what the calls in flight at that moment
report beyond their holds (a ``budget_overrun`` event says so). That is the whole bound: after the
first probe, only calls dearer than every earlier call of their model can overshoot.

Examples:
    >>> from stageflow.budgets.spec import LMBudget
    >>> know, limits = Knowledge(), LMBudget(max_tokens=1_000)
    >>> need = Need(calls=1, tokens=100, model="m")  # no known bound
    >>> first = know.hold(need, limits)
    >>> first.probe, know.fits(first)
    (True, True)
    >>> know.take(first); know.fits(know.hold(need, limits))  # a second probe waits
    False
    >>> know.learn(need, first, used=400, cost=None, completed=True, limits=limits)["reported"]
    400
    >>> know.hold(need, limits)  # learned: later calls hold 4 × their reservation, and run at once
    Hold(tokens=400, cost=0.0, probe=False)
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from stageflow.budgets.spec import LMBudget

__all__ = ["Hold", "Knowledge", "Need", "cost_over"]

#: Relative slack for comparing sums of float costs with a limit (0.01 × 5 may not add up to 0.05).
_COST_SLACK = 1e-9


def cost_over(spent: float, limit: float) -> bool:
    """Whether a cost ``spent`` passes ``limit`` (beyond float rounding)."""
    return spent > limit * (1 + _COST_SLACK) + 1e-15


class Need(NamedTuple):
    """What one LM call may use: ``calls`` requests, up to ``tokens`` tokens, on ``model``.

    ``prompt_tokens``: the prompt's share of ``tokens`` (charged to a model that reports no usage).
    ``bounded``: ``tokens`` is a true upper bound (the model stops at the ``max_tokens`` it is sent).
    ``cost_bound``: an upper bound on the call's cost from the model's prices, when known.
    """

    calls: int
    tokens: int
    model: str
    prompt_tokens: int = 0
    bounded: bool = False
    cost_bound: float | None = None


class Hold(NamedTuple):
    """What one budget holds for one call in flight: ``tokens``, ``cost``, and whether it is a probe
    (an unbounded call of a model the budget has learned nothing about yet)."""

    tokens: int
    cost: float
    probe: bool


class Knowledge:
    """What one budget has learned about each model (used under the ledger lock).

    Attributes:
        factor: By model, the largest (reported ÷ reserved) tokens seen, when above 1.
        rates: By model, the highest cost per token seen.
        least: By model, the fewest tokens and the lowest cost of a settled call.
        known: Models with a settled call.
        probing: Probes in flight.
    """

    __slots__ = ("factor", "known", "least", "probing", "rates")

    def __init__(self) -> None:
        self.factor: dict[str, float] = {}
        self.rates: dict[str, float] = {}
        self.least: dict[str, tuple[int, float]] = {}
        self.known: set[str] = set()
        self.probing = 0

    def hold(self, need: Need, limits: LMBudget) -> Hold:
        """What to hold for ``need`` in a budget with ``limits``."""
        if not self.factor and limits.max_cost is None:  # the common case, kept short
            probe = limits.max_tokens is not None and not need.bounded and need.model not in self.known
            return Hold(need.tokens, 0.0, probe)
        factor = self.factor.get(need.model, 1.0)
        least = self.least.get(need.model, (0, 0.0))
        tokens = need.tokens if factor <= 1.0 else max(math.ceil(need.tokens * factor), least[0])
        cost = 0.0
        if limits.max_cost is not None:
            learned = max(tokens * self.rates.get(need.model, 0.0), least[1])
            cost = learned if need.cost_bound is None else max(need.cost_bound * factor, learned)
        unbounded = (limits.max_tokens is not None and not need.bounded) or (
            limits.max_cost is not None and need.cost_bound is None
        )
        return Hold(tokens, cost, unbounded and need.model not in self.known)

    def fits(self, hold: Hold, enclosing: int = 0) -> bool:
        """Whether a probe may start now (another probe in flight makes it wait; ``enclosing``: the
        probes in flight that this call is made inside, which it does not wait for)."""
        return not hold.probe or self.probing <= enclosing

    def take(self, hold: Hold) -> None:
        """Note a hold taken."""
        if hold.probe:
            self.probing += 1

    def learn(
        self, need: Need, hold: Hold, *, used: int, cost: float | None, completed: bool, limits: LMBudget
    ) -> dict[str, Any] | None:
        """Note a hold given back after the call used ``used`` tokens and ``cost`` (``completed``:
        the model answered). Returns what the call overran, for a ``budget_overrun`` event, or ``None``."""
        if hold.probe:
            self.probing -= 1
        if not completed:
            return None
        model = need.model
        self.known.add(model)
        least = self.least.get(model)
        if least is None or used < least[0] or (cost or 0.0) < least[1]:
            self.least[model] = (
                (used, cost or 0.0)
                if least is None
                else (
                    min(least[0], used),
                    min(least[1], cost or 0.0),
                )
            )
        overrun: dict[str, Any] = {}
        if used > hold.tokens and need.tokens > 0:
            self.factor[model] = max(self.factor.get(model, 1.0), used / need.tokens)
            if limits.max_tokens is not None:
                overrun.update(limit="max_tokens", reserved=hold.tokens, reported=used)
        if cost is not None and cost > 0:
            self.rates[model] = max(self.rates.get(model, 0.0), cost / max(hold.tokens, used, 1))
            if limits.max_cost is not None and not hold.probe and cost_over(cost, hold.cost):
                overrun.update(cost_limit="max_cost", cost_reserved=hold.cost, cost_reported=cost)
        if not overrun:
            return None
        return {"model": model, "probe": hold.probe, **overrun}
