"""Recovery policies: small frozen objects that say what to do when a stage fails.

Attach them to one stage with ``Stage(x, retry=..., timeout=..., fallback=..., repair=...)`` or to
every stage of a pipeline with ``pipeline.set_defaults(...)`` (a stage's own policy of a kind wins
over the default of that kind). The engine applies them in this order for each stage call:

1. ``timeout``: the call may take at most ``seconds`` of run time, counted from when it starts
   running (not while it waits for a concurrency slot); async calls are cancelled; a sync call's
   thread cannot be, and is abandoned and counted;
2. ``retry``: a transient error (:func:`is_retryable`: DSPy's LM error classification, LiteLLM and
   HTTP-client errors DSPy wrapped, HTTP 408/429/5xx, timeouts, connection errors) is retried with
   exponential backoff and jitter, honouring a server's ``Retry-After`` up to ``max_delay``;
3. ``repair``: an output that breaks its contract (DSPy's ``AdapterParseError``, a pydantic
   validation error, a missing declared output) is asked for again with the error shown to the
   model, a bounded number of times;
4. ``fallback``: another stage, or a default output, once the above are exhausted (a fallback that
   cannot replace the result raises an error naming both, caused by the original one);
5. ``recover`` / ``skip_on``: used by :class:`~stageflow.ErrorHandlingPipeline`.

Retries call the *same* stage object (with a new ``rollout_id``), so DSPy optimizers still see
every trace. Every retry, repair, fallback and timeout is recorded in ``result.run.events``.
"""

from __future__ import annotations

import copy
import os
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar, cast

from stageflow import _checks
from stageflow.errors import ConfigurationError, ContractError
from stageflow.policies.transient import causes, explicit_causes, is_retryable, retry_after

if TYPE_CHECKING:
    from stageflow.budgets.spec import LMBudget
    from stageflow.policies.cache import CachePolicy

__all__ = [
    "ErrorMatch",
    "Fallback",
    "PolicyEvent",
    "Recover",
    "RepairPolicy",
    "RetryPolicy",
    "StagePolicy",
    "TimeoutPolicy",
    "HELD",
    "causes",
    "is_repairable",
    "is_retryable",
    "make_policy",
    "retry_after",
]

P = TypeVar("P")

Recover = Callable[[BaseException, dict[str, Any]], Any]
"""A recovery function: ``(error, state) -> new state``, or ``None`` when it cannot recover."""


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


#: Marks a fallback stage held by the :class:`~stageflow.Stage` wrapper (so DSPy sees it).
HELD = "<held by the Stage wrapper>"

ErrorMatch = type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
"""Which errors a policy applies to: an exception type, a tuple of them, or a predicate."""


def _matcher(value: object, where: str, name: str) -> Callable[[BaseException], bool]:
    """A predicate for ``value`` (see :data:`ErrorMatch`); anything else is refused.

    Types match the error or any error it was raised ``from`` (DSPy raises its LM errors from
    the provider's), never an error that merely happened while handling another.
    """
    kinds = (value,) if isinstance(value, type) else value
    if isinstance(kinds, tuple):
        if kinds and all(isinstance(t, type) and issubclass(t, BaseException) for t in kinds):
            types: tuple[type[BaseException], ...] = kinds
            return lambda error: any(isinstance(e, types) for e in explicit_causes(error))
    elif callable(value):
        return cast("Callable[[BaseException], bool]", value)
    raise ConfigurationError(
        f"{where}: {name} takes an exception type, a tuple of exception types or a function "
        f"(error) -> bool, got {value!r}.",
        field=name,
        code="bad_option",
        hint=f"e.g. {name}=(ConnectionError, TimeoutError)",
    )


def _check_callables(owner: object, where: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and not callable(value):
            raise ConfigurationError(
                f"{where}: {name} must be callable, got {value!r}.", field=name, code="bad_option"
            )


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient failures with exponential backoff and jitter.

    Every numeric option is checked when the policy is made: a bad value raises
    :class:`~stageflow.ConfigurationError` naming it.

    Examples:
        >>> RetryPolicy(max_attempts=4, retry_on=(ConnectionError, TimeoutError)).max_attempts
        4
        >>> RetryPolicy(max_delay=float("nan"))
        Traceback (most recent call last):
        ...
        stageflow.errors.ConfigurationError: RetryPolicy: max_delay must be a finite number >= 0, got nan.
    """

    max_attempts: int = 3
    """Attempts in all, the first included."""
    initial_delay: float = 0.5
    """Seconds before the first retry."""
    backoff: float = 2.0
    """Each further delay is multiplied by this."""
    max_delay: float = 30.0
    """No single wait is longer than this — a server's ``Retry-After`` included."""
    jitter: float = 0.1
    """Random extra delay, as a fraction of the delay (0 = none)."""
    retry_on: ErrorMatch = is_retryable
    """Which errors to retry: an exception type or a tuple of them (the error, or an error it was
    raised ``from``, is an instance), or a predicate ``(error) -> bool``. Default:
    :func:`is_retryable`."""
    sleep: Callable[[float], object] = time.sleep
    """How to wait in sync calls (inject a fake in tests)."""
    asleep: Callable[[float], Awaitable[object]] | None = None
    """How to wait in async calls (default ``asyncio.sleep``)."""
    rng: Callable[[], float] = random.random
    """Source of jitter in [0, 1)."""
    max_elapsed: float | None = None
    """Time budget in seconds, from the first attempt: a retry whose wait would end after it is
    not taken, and the last error is raised at once (``None``: no limit)."""
    clock: Callable[[], float] = time.monotonic
    """The clock ``max_elapsed`` is measured with (inject a fake in tests)."""
    _should_retry: Callable[[BaseException], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _checks.count(self.max_attempts, "RetryPolicy", "max_attempts", 1)
        for name in ("initial_delay", "backoff", "max_delay", "jitter"):
            _checks.non_negative(getattr(self, name), "RetryPolicy", name)
        if self.max_elapsed is not None:
            _checks.seconds(self.max_elapsed, "RetryPolicy", "max_elapsed")
        _check_callables(self, "RetryPolicy", ("sleep", "asleep", "rng", "clock"))
        object.__setattr__(self, "_should_retry", _matcher(self.retry_on, "RetryPolicy", "retry_on"))

    def should_retry(self, error: BaseException) -> bool:
        """Whether ``error`` is one :attr:`retry_on` selects.

        Examples:
            >>> RetryPolicy(retry_on=ValueError).should_retry(KeyError("k"))
            False
        """
        return self._should_retry(error)

    def delay(self, attempt: int, error: BaseException) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1).

        A server's ``Retry-After`` (see :func:`retry_after`) replaces the backoff, without jitter;
        either way the wait is at most :attr:`max_delay`.

        Examples:
            >>> class Limited(Exception):
            ...     headers = {"retry-after": "86400"}
            >>> RetryPolicy(max_delay=30).delay(1, Limited("429"))
            30.0
        """
        hinted = retry_after(error)
        if hinted is not None:
            return min(hinted, float(self.max_delay))
        base = min(self.initial_delay * self.backoff ** (attempt - 1), self.max_delay)
        return min(base + base * self.jitter * self.rng(), self.max_delay)


@dataclass(frozen=True)
class TimeoutPolicy:
    """Wall-clock limit for one stage call (each attempt).

    The clock starts when the call starts running: waiting for a concurrency slot
    (``stageflow.limits``, a pattern's ``max_concurrency``) or for a thread is not the stage's run
    time. A sync call runs on a thread of its own (never one of the shared pool its fan-out may
    be using); when it times out, that thread cannot be stopped and is counted by
    :func:`stageflow.engine.concurrency.abandoned_threads`.

    Examples:
        >>> TimeoutPolicy(2.5).seconds
        2.5
        >>> TimeoutPolicy(float("inf"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        stageflow.errors.ConfigurationError: TimeoutPolicy: seconds must be a finite number ... > 0, got inf.
        Fix: pass e.g. seconds=30
    """

    seconds: float
    """The limit, in seconds: a finite number > 0."""

    def __post_init__(self) -> None:
        _checks.seconds(self.seconds, "TimeoutPolicy", "seconds")


@dataclass(frozen=True)
class RepairPolicy:
    """Ask again, showing the validation error, when a stage's output breaks its contract."""

    max_repairs: int = 2
    """Extra attempts for contract failures (on top of retries)."""
    repair_on: ErrorMatch = is_repairable
    """Which errors are contract failures: an exception type, a tuple of them or a predicate
    (default: :func:`is_repairable`)."""
    _should_repair: Callable[[BaseException], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _checks.count(self.max_repairs, "RepairPolicy", "max_repairs", 0)
        object.__setattr__(self, "_should_repair", _matcher(self.repair_on, "RepairPolicy", "repair_on"))

    def should_repair(self, error: BaseException) -> bool:
        """Whether ``error`` is one :attr:`repair_on` selects."""
        return self._should_repair(error)


@dataclass(frozen=True)
class Fallback:
    """What to use when the stage still fails: another stage (``Stage(x, fallback=Fallback(stage))``
    holds it, so it stays optimizable) or a default output mapping.

    A fallback never hides the failure it replaces: when the fallback stage fails too, or the
    default lacks an output the stage declares, the stage fails with a
    :class:`~stageflow.StageError` (code ``fallback_failed``) that names both errors and has the
    original one as ``__cause__``.
    """

    stage: Callable[..., object] | str | None = None
    """A stage to run with the same inputs."""
    default: Mapping[str, object] | None = None
    """Outputs to use as they are."""

    def __post_init__(self) -> None:
        if (self.stage is None) == (self.default is None):
            raise ConfigurationError("Fallback needs exactly one of stage= or default=.", code="bad_option")
        if self.default is not None and (
            not isinstance(self.default, Mapping) or not all(isinstance(k, str) for k in self.default)
        ):
            raise ConfigurationError(
                f"Fallback: default must be a mapping of output names (str) to values, got {self.default!r}.",
                field="default",
                code="bad_option",
            )
        if self.default is not None:  # (as it was when given: a later change to your dict is not seen)
            object.__setattr__(self, "default", {k: _as_given(v) for k, v in self.default.items()})
        if self.stage is not None and self.stage is not HELD and not callable(self.stage):
            raise ConfigurationError(
                f"Fallback: stage must be a stage (a module or a function), got {self.stage!r}.",
                field="stage",
                code="bad_option",
            )


def _cache_policy(cache: CachePolicy | bool | int | str | os.PathLike[str] | None) -> CachePolicy | None:
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


def make_policy(
    *,
    retry: RetryPolicy | int | None = None,
    timeout: TimeoutPolicy | float | None = None,
    repair: RepairPolicy | int | bool | None = None,
    fallback: Fallback | None = None,
    recover: Recover | None = None,
    skip_on: Iterable[type[BaseException]] | None = (),
    cache: CachePolicy | bool | int | str | os.PathLike[str] | None = None,
    budget: LMBudget | Mapping[str, Any] | None = None,
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
        _checks.seconds(timeout, "stage policy", "timeout")
        timeout = TimeoutPolicy(timeout)
    if repair is True:
        repair = RepairPolicy()
    elif isinstance(repair, int) and not isinstance(repair, bool):
        repair = RepairPolicy(max_repairs=repair)
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
        retry=_given("retry", retry, RetryPolicy),
        timeout=_given("timeout", timeout, TimeoutPolicy),
        repair=_given("repair", repair, RepairPolicy),
        fallback=_given("fallback", fallback, Fallback),
        recover=recover,
        skip_on=skip,
        cache=_cache_policy(cache),
        budget=budget,
    )


def _given(name: str, value: object, kind: type[P]) -> P | None:
    """``value`` when it is a ``kind``; ``None`` for ``None``/``False``; anything else is refused."""
    if value is None or value is False:
        return None
    if not isinstance(value, kind):
        raise ConfigurationError(
            f"{name}= takes a {kind.__name__}, got {value!r}.", field=name, code="bad_option"
        )
    return value


@dataclass(frozen=True)
class StagePolicy:
    """Every policy of one stage (what the engine reads)."""

    retry: RetryPolicy | None = None
    timeout: TimeoutPolicy | None = None
    repair: RepairPolicy | None = None
    fallback: Fallback | None = None
    recover: Recover | None = None
    skip_on: tuple[type[BaseException], ...] = ()
    skip_if: Callable[[BaseException], bool] | None = None
    """A predicate on the (original) error: ``True`` skips the stage like :attr:`skip_on` does."""
    cache: CachePolicy | None = None
    error_field: str | None = None
    """A result field that, when truthy, reports the stage failed (the tutorial's ``StageOutput.error``)."""
    budget: LMBudget | None = None
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
            skip_if=self.skip_if or defaults.skip_if,
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


def _as_given(value: object) -> object:
    """A deep copy of ``value`` (a fallback default's), or ``value`` itself when it cannot be copied
    (a lock, a client): a later change to a list of yours does not change the default."""
    try:
        return copy.deepcopy(value)
    except Exception:
        return value
