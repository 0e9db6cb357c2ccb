"""Recovery policies: small frozen objects that say what to do when a stage fails.

Attach them to one stage with ``Stage(x, retry=..., timeout=..., fallback=..., repair=...)`` or to
every stage of a pipeline with ``pipeline.set_defaults(...)`` (a stage's own policy of a kind wins
over the default of that kind). The engine applies them in this order for each stage call:

1. ``timeout``: the call may take at most ``seconds`` (async calls are cancelled; a sync call's
   thread cannot be, and is abandoned and counted);
2. ``retry``: a retryable error (DSPy's LM error classification, timeouts, connection errors)
   is retried with exponential backoff and jitter, honouring a provider's ``retry_after``;
3. ``repair``: an output that breaks its contract (DSPy's ``AdapterParseError``, a pydantic
   validation error, a missing declared output) is asked for again with the error shown to the
   model, a bounded number of times;
4. ``fallback``: another stage, or a default output, once the above are exhausted;
5. ``recover`` / ``skip_on``: used by :class:`~stageflow.ErrorHandlingPipeline`.

Retries call the *same* stage object (with a new ``rollout_id``), so DSPy optimizers still see
every trace. Every retry, repair, fallback and timeout is recorded in ``result.run.events``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from stageflow.errors import ConfigurationError, ContractError, StageTimeoutError

__all__ = [
    "Fallback",
    "PolicyEvent",
    "RepairPolicy",
    "RetryPolicy",
    "StagePolicy",
    "TimeoutPolicy",
    "HELD",
    "causes",
    "is_repairable",
    "is_retryable",
    "make_policy",
]


def causes(error: BaseException) -> list[BaseException]:
    """``error`` and its chain of causes/contexts, innermost last (cycles stopped)."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        chain.append(e)
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return chain


def is_retryable(error: BaseException) -> bool:
    """Transient failures: DSPy's retryable LM errors, timeouts and connection errors."""
    from dspy.utils.exceptions import is_retryable_lm_error

    for e in causes(error):
        if isinstance(e, TimeoutError | ConnectionError | StageTimeoutError):
            return True
        if isinstance(e, Exception) and is_retryable_lm_error(e):
            return True
    return False


def is_repairable(error: BaseException) -> bool:
    """Output that broke its contract: a parse error, a validation error, a missing output."""
    from dspy.utils.exceptions import AdapterParseError
    from pydantic import ValidationError

    for e in causes(error):
        if isinstance(e, AdapterParseError | ValidationError):
            return True
        if isinstance(e, ContractError) and e.code in ("missing_output", "invalid_output"):
            return True
    return False


def _retry_after(error: BaseException) -> float | None:
    for e in causes(error):
        value = getattr(e, "retry_after", None)
        if isinstance(value, int | float) and value >= 0:
            return float(value)
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient failures with exponential backoff and jitter."""

    max_attempts: int = 3
    """Attempts in all, the first included."""
    initial_delay: float = 0.5
    """Seconds before the first retry."""
    backoff: float = 2.0
    """Each further delay is multiplied by this."""
    max_delay: float = 30.0
    """No single delay is longer than this (a provider's ``retry_after`` may be)."""
    jitter: float = 0.1
    """Random extra delay, as a fraction of the delay (0 = none)."""
    retry_on: Callable[[BaseException], bool] = is_retryable
    """Which errors to retry (default: :func:`is_retryable`)."""
    sleep: Callable[[float], Any] = time.sleep
    """How to wait in sync calls (inject a fake in tests)."""
    asleep: Callable[[float], Any] | None = None
    """How to wait in async calls (default ``asyncio.sleep``)."""
    rng: Callable[[], float] = random.random
    """Source of jitter in [0, 1)."""
    max_elapsed: float | None = None
    """Stop retrying once this many seconds have passed since the first attempt (``None``: no limit)."""
    clock: Callable[[], float] = time.monotonic
    """The clock ``max_elapsed`` is measured with (inject a fake in tests)."""

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_attempts, bool)
            or not isinstance(self.max_attempts, int)
            or self.max_attempts < 1
        ):
            raise ConfigurationError(
                f"RetryPolicy: max_attempts must be an int >= 1, got {self.max_attempts!r}.",
                field="max_attempts",
                code="bad_option",
            )
        for name in ("initial_delay", "backoff", "max_delay", "jitter"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"RetryPolicy: {name} must be >= 0.", field=name, code="bad_option")

    def delay(self, attempt: int, error: BaseException) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        hinted = _retry_after(error)
        if hinted is not None:
            return hinted
        base = min(self.initial_delay * self.backoff ** (attempt - 1), self.max_delay)
        return min(base + base * self.jitter * self.rng(), self.max_delay)


@dataclass(frozen=True)
class TimeoutPolicy:
    """Wall-clock limit for one stage call (each attempt)."""

    seconds: float
    """The limit, in seconds."""

    def __post_init__(self) -> None:
        if not isinstance(self.seconds, int | float) or isinstance(self.seconds, bool) or self.seconds <= 0:
            raise ConfigurationError(
                f"TimeoutPolicy: seconds must be > 0, got {self.seconds!r}.",
                field="seconds",
                code="bad_option",
            )


@dataclass(frozen=True)
class RepairPolicy:
    """Ask again, showing the validation error, when a stage's output breaks its contract."""

    max_repairs: int = 2
    """Extra attempts for contract failures (on top of retries)."""
    repair_on: Callable[[BaseException], bool] = is_repairable
    """Which errors are contract failures (default: :func:`is_repairable`)."""

    def __post_init__(self) -> None:
        if (
            isinstance(self.max_repairs, bool)
            or not isinstance(self.max_repairs, int)
            or self.max_repairs < 0
        ):
            raise ConfigurationError(
                f"RepairPolicy: max_repairs must be an int >= 0, got {self.max_repairs!r}.",
                field="max_repairs",
                code="bad_option",
            )


@dataclass(frozen=True)
class Fallback:
    """What to use when the stage still fails: another stage (``Stage(x, fallback=Fallback(stage))``
    holds it, so it stays optimizable) or a default output mapping."""

    stage: Any = None
    """A stage to run with the same inputs."""
    default: Mapping[str, Any] | None = None
    """Outputs to use as they are."""

    def __post_init__(self) -> None:
        if (self.stage is None) == (self.default is None):
            raise ConfigurationError("Fallback needs exactly one of stage= or default=.", code="bad_option")


def _cache_policy(cache: Any) -> Any:
    if cache is None or cache is False:
        return None
    from stageflow.policies.cache import CachePolicy, MemoryStore

    if cache is True:
        return CachePolicy()
    if isinstance(cache, int) and not isinstance(cache, bool):
        return CachePolicy(MemoryStore(cache))
    if isinstance(cache, str | os.PathLike):
        from stageflow.policies.stores import SQLiteStore

        return CachePolicy(persistent=SQLiteStore(cache))
    if isinstance(cache, CachePolicy):
        return cache
    raise ConfigurationError(
        f"cache= takes True, a size, a database path or a CachePolicy, got {cache!r}.",
        field="cache",
        code="bad_option",
    )


#: Marks a fallback stage held by the :class:`~stageflow.Stage` wrapper (so DSPy sees it).
HELD = "<held by the Stage wrapper>"


def make_policy(
    *,
    retry: Any = None,
    timeout: Any = None,
    repair: Any = None,
    fallback: Any = None,
    recover: Any = None,
    skip_on: Any = (),
    cache: Any = None,
    budget: Any = None,
) -> StagePolicy:
    """Build a :class:`StagePolicy` from friendly arguments.

    ``retry`` may be a :class:`RetryPolicy` or an int (max attempts); ``timeout`` a
    :class:`TimeoutPolicy` or seconds; ``repair`` a :class:`RepairPolicy`, an int (max repairs) or
    ``True``; ``fallback`` a :class:`Fallback`; ``skip_on`` exception types; ``budget`` a
    :class:`~stageflow.LMBudget` or a dict of its fields.
    """
    if isinstance(retry, int) and not isinstance(retry, bool):
        retry = RetryPolicy(max_attempts=retry)
    if isinstance(timeout, int | float) and not isinstance(timeout, bool):
        timeout = TimeoutPolicy(timeout)
    if repair is True:
        repair = RepairPolicy()
    elif isinstance(repair, int) and not isinstance(repair, bool):
        repair = RepairPolicy(max_repairs=repair)
    cache = _cache_policy(cache)
    for name, value, kind in (
        ("retry", retry, RetryPolicy),
        ("timeout", timeout, TimeoutPolicy),
        ("repair", repair, RepairPolicy),
        ("fallback", fallback, Fallback),
    ):
        if value is not None and value is not False and not isinstance(value, kind):
            raise ConfigurationError(
                f"{name}= takes a {kind.__name__}, got {value!r}.", field=name, code="bad_option"
            )
    if recover is not None and not callable(recover):
        raise ConfigurationError(
            f"recover= takes a callable (error, state) -> state | None, got {recover!r}.",
            field="recover",
            code="bad_option",
        )
    skip = tuple(skip_on or ())
    if not all(isinstance(t, type) and issubclass(t, BaseException) for t in skip):
        raise ConfigurationError(
            f"skip_on= takes exception types, got {skip_on!r}.", field="skip_on", code="bad_option"
        )
    if budget is not None:
        from stageflow.budgets.spec import as_budget

        budget = as_budget(budget, "budget=")
    return StagePolicy(
        retry=retry or None,
        timeout=timeout,
        repair=repair or None,
        fallback=fallback,
        recover=recover,
        skip_on=skip,
        cache=cache,
        budget=budget,
    )


@dataclass(frozen=True)
class StagePolicy:
    """Every policy of one stage (what the engine reads)."""

    retry: RetryPolicy | None = None
    timeout: TimeoutPolicy | None = None
    repair: RepairPolicy | None = None
    fallback: Fallback | None = None
    recover: Callable[[BaseException, dict[str, Any]], Any] | None = None
    skip_on: tuple[type[BaseException], ...] = ()
    cache: Any = None
    error_field: str | None = None
    """A result field that, when truthy, reports the stage failed (the tutorial's ``StageOutput.error``)."""
    budget: Any = None
    """An :class:`~stageflow.LMBudget` each call of the stage (retries included) runs under."""

    def merged_over(self, defaults: StagePolicy | None) -> StagePolicy:
        """This policy, with each kind it does not set taken from ``defaults``."""
        if defaults is None:
            return self
        return replace(
            self,
            retry=self.retry or defaults.retry,
            timeout=self.timeout or defaults.timeout,
            repair=self.repair or defaults.repair,
            fallback=self.fallback or defaults.fallback,
            recover=self.recover or defaults.recover,
            skip_on=self.skip_on or defaults.skip_on,
            cache=self.cache or defaults.cache,
            error_field=self.error_field or defaults.error_field,
            budget=self.budget or defaults.budget,
        )

    def is_empty(self) -> bool:
        """No policy of any kind."""
        return self == StagePolicy()


@dataclass(frozen=True)
class PolicyEvent:
    """One thing a policy did, recorded in ``result.run.events``.

    Attributes:
        stage: Full stage path.
        kind: ``retry``, ``repair``, ``timeout``, ``fallback``, ``recovered``, ``skipped``,
            or ``cache_hit``.
        attempt: The attempt that failed (1-based), when relevant.
        error: ``"Type: message"`` of the error that triggered it.
        delay: Seconds waited before the next attempt.
    """

    stage: str
    kind: str
    attempt: int = 0
    error: str = ""
    delay: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)
