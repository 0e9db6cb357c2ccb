"""What a budget allows: :class:`LMBudget` (hard limits) and :class:`Degrade` (what to give up first).

Both are frozen value objects, checked when built: a negative, NaN, infinite or boolean limit is
refused with a :class:`~stageflow.ConfigurationError` naming the field.

Examples:
    >>> from stageflow.budgets import LMBudget, Degrade
    >>> LMBudget(max_calls=20, max_tokens=50_000).describe()
    'max_calls=20, max_tokens=50000'
    >>> LMBudget(max_calls=-1)
    Traceback (most recent call last):
    ...
    stageflow.errors.ConfigurationError: LMBudget: max_calls must be a non-negative int or None, got -1.
    Fix: pass max_calls=None for no limit
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stageflow.errors import ConfigurationError

__all__ = ["DEFAULT_MAX_TOKENS", "Degrade", "LMBudget", "as_budget"]

#: Output tokens reserved for an LM call that sets no ``max_tokens`` (DSPy's default LM sets none).
DEFAULT_MAX_TOKENS = 4096

_LIMITS = ("max_calls", "max_tokens", "max_cost", "max_seconds")
_INTS = ("max_calls", "max_tokens")


def _positive(
    owner: str, name: str, value: Any, *, integer: bool, allow_none: bool = True, zero: bool = False
) -> None:
    if value is None and allow_none:
        return
    sign = "non-negative" if zero else "positive"
    kind = f"a {sign} int" if integer else f"a finite {sign} number"
    ok = not isinstance(value, bool) and isinstance(value, int if integer else int | float)
    if ok and not integer:
        ok = math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not zero):
        raise ConfigurationError(
            f"{owner}: {name} must be {kind}{' or None' if allow_none else ''}, got {value!r}.",
            field=name,
            code="bad_option",
            hint=f"pass {name}=None for no limit" if allow_none else None,
        )


@dataclass(frozen=True)
class Degrade:
    """What a budget gives up once a share of it is spent, instead of failing later.

    Each degradation is recorded once in the run's events (``result.run.events``, kind
    ``budget_degraded``), and each stage skipped or ensemble trimmed because of it too.

    Examples:
        >>> Degrade(at=0.5, max_members=2).at
        0.5
    """

    at: float = 0.8
    """Start when this share (0 < at ≤ 1) of any limit is spent (the largest share among the limits
    set; for ``max_seconds``, the share of the time passed)."""
    lm: Any = None
    """A cheaper ``dspy.LM`` for the stages that start after that (the stages whose predictors use the
    configured LM; a predictor with its own ``.lm`` keeps it)."""
    max_members: int | None = None
    """Ensembles (:class:`~stageflow.EnsemblePipeline`) that start after that run only their first
    ``max_members`` members."""
    skip: Sequence[str] = ()
    """Full stage paths (``"stages[2]"``; ``*`` wildcards allowed) not run after that: only stages whose
    outputs nothing downstream needs (a polishing pass, a critique)."""

    def __post_init__(self) -> None:
        at = self.at
        if isinstance(at, bool) or not isinstance(at, int | float) or not (0 < at <= 1):
            raise ConfigurationError(
                f"Degrade: at must be a share of the budget in (0, 1], got {at!r}.",
                field="at",
                code="bad_option",
            )
        _positive("Degrade", "max_members", self.max_members, integer=True)
        if isinstance(self.skip, str) or not all(isinstance(p, str) and p for p in self.skip):
            raise ConfigurationError(
                f"Degrade: skip takes a list of stage paths, got {self.skip!r}.",
                field="skip",
                code="bad_option",
                hint="write skip=['stages[2]'], not skip='stages[2]'",
            )
        object.__setattr__(self, "skip", tuple(self.skip))
        if self.lm is None and self.max_members is None and not self.skip:
            raise ConfigurationError(
                "Degrade: give at least one of lm=, max_members= or skip=.", field="lm", code="bad_option"
            )

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary (what the ``budget_degraded`` event carries)."""
        out: dict[str, Any] = {"at": self.at}
        if self.lm is not None:
            out["lm"] = getattr(self.lm, "model", repr(self.lm))
        if self.max_members is not None:
            out["max_members"] = self.max_members
        if self.skip:
            out["skip"] = list(self.skip)
        return out


@dataclass(frozen=True)
class LMBudget:
    """Hard limits on the LM work of a block, a pipeline run or a stage call.

    Not to be confused with ``stageflow.limits(max_concurrency=...)`` (how many stages run *at once*;
    :mod:`stageflow.engine.budget`): an ``LMBudget`` caps how much LM work is done *in all*.

    Before each LM call the budget reserves what the call may use — one call per completion asked
    for (``n``), and tokens: the prompt's UTF-8 byte count (no byte-level tokenizer makes more tokens
    than bytes) plus the call's ``max_tokens`` (or :attr:`default_max_tokens`) — and settles the
    reservation with the usage the model reports once the call returns. A call that could overshoot
    a limit waits for calls in flight to settle, and is refused with
    :class:`~stageflow.BudgetExceeded` when it cannot fit even then. So concurrent calls never overshoot
    (a model that reports more tokens than it was allowed could).
    """

    max_calls: int | None = None
    """LM calls that reach the model, retries included (0: none may). Answers from DSPy's LM cache or
    stageflow's stage cache are free."""
    max_tokens: int | None = None
    """Tokens, prompt plus completion, as the model reports them."""
    max_cost: float | None = None
    """Cost in the model's currency (USD for DSPy's price table), for models that report one. A cost
    is only known after a call: each call reserves its token reservation × the highest cost per
    reserved token this budget has seen from that model (so a call like an earlier one reserves about
    what that one cost). Until a model's first call settles, and for a call dearer than any before,
    the calls in flight can overshoot by the difference."""
    max_seconds: float | None = None
    """Wall seconds since the budget opened: no LM call starts after that (a call in flight is not
    interrupted; use a ``TimeoutPolicy`` for that)."""
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    """Completion tokens reserved for a call that sets no ``max_tokens``."""
    degrade: Degrade | None = None
    """What to give up once part of the budget is spent (see :class:`Degrade`)."""
    clock: Callable[[], float] = field(default=time.monotonic, compare=False)
    """The clock ``max_seconds`` is measured with (inject a fake in tests)."""

    def __post_init__(self) -> None:
        for name in _LIMITS:
            _positive("LMBudget", name, getattr(self, name), integer=name in _INTS, zero=True)
        _positive("LMBudget", "default_max_tokens", self.default_max_tokens, integer=True, allow_none=False)
        if self.degrade is not None and not isinstance(self.degrade, Degrade):
            raise ConfigurationError(
                f"LMBudget: degrade takes a stageflow.Degrade, got {self.degrade!r}.",
                field="degrade",
                code="bad_option",
                hint="LMBudget(..., degrade=stageflow.Degrade(at=0.8, lm=cheaper_lm))",
            )
        if not callable(self.clock):
            raise ConfigurationError(
                f"LMBudget: clock must be callable, got {self.clock!r}.", field="clock", code="bad_option"
            )

    def describe(self) -> str:
        """The limits that are set, as ``name=value`` pairs."""
        return ", ".join(f"{n}={getattr(self, n)!r}" for n in _LIMITS if getattr(self, n) is not None)

    def is_unlimited(self) -> bool:
        """No limit is set (such a budget only accounts)."""
        return all(getattr(self, n) is None for n in _LIMITS)


def as_budget(value: Any, where: str, options: dict[str, Any] | None = None) -> LMBudget | None:
    """An :class:`LMBudget` from ``value`` (an ``LMBudget``, a mapping of its fields, or ``None``) and
    keyword ``options``; anything else is refused."""
    options = options or {}
    if isinstance(value, LMBudget):
        if options:
            raise ConfigurationError(
                f"{where}: pass an LMBudget or keyword limits, not both.", code="bad_option", field="budget"
            )
        return value
    if value is None and not options:
        return None
    if isinstance(value, dict):
        options = {**value, **options}
    elif value is not None:
        raise ConfigurationError(
            f"{where}: budget takes a stageflow.LMBudget or a dict of its limits, got {value!r}.",
            field="budget",
            code="bad_option",
            hint="stageflow.LMBudget(max_calls=20, max_tokens=50_000)",
        )
    known = set(LMBudget.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigurationError(
            f"{where}: unknown budget option(s) {unknown}. Known: {sorted(known)}.",
            field=unknown[0],
            code="unknown_option",
        )
    return LMBudget(**options)
