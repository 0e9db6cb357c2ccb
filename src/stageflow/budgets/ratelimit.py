"""Requests-per-minute and tokens-per-minute limits per model, shared by the whole process.

``stageflow.rate_limit("openai/gpt-4o-mini", rpm=500, tpm=200_000)`` holds every LM call to that
model — from any stage, thread, asyncio task, batch record or DSPy worker thread — to the limits.
The limiter keeps a log of the last window (60 s): a call starts only when the requests (and
tokens) granted in the window ending now, plus its own, stay within the limit, so *every* 60-second
window stays at or under it (a refilling token bucket would let a full bucket's burst and a
minute's refill through in the same minute: up to twice the limit). Cache hits take nothing.

Tokens are counted as the call's estimate when it starts (prompt characters / 4 plus its
``max_tokens``) and corrected to what the model reports when it ends. The estimate of later calls
adds the most any of the model's last 8 calls used beyond its estimate (at most ``tpm``) (an answer without a
``max_tokens`` bound is not in the estimate at all), so once answers have been seen the windows stay
under ``tpm`` while their size holds; calls started before any answer came back can push their window
over by what they used beyond their estimates. A call refused by the server with a
``Retry-After`` (DSPy's ``LMRateLimitError.retry_after``) pauses the model's limiter until then, for
every caller, for at most ``max_pause`` seconds (60 by default; a longer or unreadable value is
logged). The time calls wait is in the run's usage (``limit_wait`` per stage), its events
(``rate_limited``) and the limiter's :attr:`RateLimiter.waited`.

Not to be confused with :func:`stageflow.limits` (how many stages run at once).

Examples:
    >>> clock = [0.0]
    >>> limiter = RateLimiter("m", rpm=2, clock=lambda: clock[0])
    >>> limiter.try_acquire(1, 0) is not None, limiter.try_acquire(1, 0) is not None
    (True, True)
    >>> limiter.try_acquire(1, 0) is None  # a third request in the same minute waits
    True
    >>> limiter.delay(1, 0)
    60.0
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from stageflow.errors import ConfigurationError

__all__ = ["RateLimiter", "Slot", "limiter_for", "rate_limit", "rate_limits"]

logger = logging.getLogger("stageflow")

_REGISTRY: dict[str, RateLimiter] = {}
_REGISTRY_LOCK = threading.Lock()
_MIN_WAIT = 1e-6  # so a clock that sleeps exactly the wait always moves past the expiry
_LEARNED = 8  # settled calls whose excess over their estimate the next estimates take into account


class _Use:
    """Tokens one grant counts in the window (corrected when the call settles); ``estimate`` is the
    caller's estimate, before the learned excess was added."""

    __slots__ = ("estimate", "live", "t", "tokens")

    def __init__(self, t: float, tokens: int, estimate: int) -> None:
        self.t, self.tokens, self.live, self.estimate = t, tokens, True, estimate


class Slot:
    """What one call was granted: ``requests`` stamps at time ``t`` and a token entry."""

    __slots__ = ("requests", "t", "use")

    def __init__(self, t: float, requests: int, use: _Use) -> None:
        self.t, self.requests, self.use = t, requests, use


def _limit(name: str, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"rate_limit: {name} must be a positive int or None, got {value!r}.",
            field=name,
            code="bad_option",
            hint=f"pass {name}=None for no {name} limit",
        )


class RateLimiter:
    """The sliding-window limiter of one model (see the module docstring). Build it with
    :func:`rate_limit`; it is also a context manager that removes itself on exit.

    Attributes:
        model: The model string it holds (``lm.model``, exactly).
        rpm: Requests per window (``None``: no limit). ``tpm``: tokens per window.
        requests: Requests granted so far. ``tokens``: tokens counted (settled figures).
        waits: Calls that had to wait. ``waited``: seconds they waited in all.
        pauses: ``Retry-After`` pauses honoured.
        max_pause: The longest pause a ``Retry-After`` can impose (seconds).
        excess: Tokens added to each call's estimate: the most one of the last 8 calls used beyond
            its estimate, at most ``tpm``.
        grants: Every grant's time (only with ``record=True``: for tests and audits).
    """

    def __init__(
        self,
        model: str,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Any] = time.sleep,
        asleep: Callable[[float], Any] | None = None,
        record: bool = False,
        max_pause: float = 60.0,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise ConfigurationError(
                f"rate_limit: model must be the LM's model string (lm.model), got {model!r}.",
                field="model",
                code="bad_option",
                hint='stageflow.rate_limit("openai/gpt-4o-mini", rpm=500)',
            )
        _limit("rpm", rpm)
        _limit("tpm", tpm)
        if rpm is None and tpm is None:
            raise ConfigurationError(
                f"rate_limit({model!r}): give rpm= and/or tpm=.", field="rpm", code="bad_option"
            )
        bad_window = isinstance(window, bool) or not isinstance(window, int | float)
        if bad_window or not math.isfinite(window) or window <= 0:
            raise ConfigurationError(
                f"rate_limit: window must be a positive number of seconds, got {window!r}.",
                field="window",
                code="bad_option",
            )
        bad_pause = isinstance(max_pause, bool) or not isinstance(max_pause, int | float)
        if bad_pause or not math.isfinite(max_pause) or max_pause < 0:
            raise ConfigurationError(
                f"rate_limit: max_pause must be a finite number of seconds >= 0, got {max_pause!r}.",
                field="max_pause",
                code="bad_option",
            )
        self.model, self.rpm, self.tpm, self.window = model, rpm, tpm, float(window)
        self.max_pause = float(max_pause)
        self.excess = 0
        self._excesses: deque[int] = deque(maxlen=_LEARNED)
        self.clock, self.sleep, self.asleep = clock, sleep, asleep
        self.requests = 0
        self.tokens = 0
        self.waits = 0
        self.waited = 0.0
        self.pauses = 0
        self.grants: list[float] | None = [] if record else None
        self._lock = threading.Lock()
        self._stamps: deque[float] = deque()
        self._uses: deque[_Use] = deque()
        self._window_tokens = 0
        self._paused_until = -math.inf

    def __repr__(self) -> str:
        return f"RateLimiter({self.model!r}, rpm={self.rpm}, tpm={self.tpm}; {self.requests} requests)"

    def __deepcopy__(self, memo: dict[int, Any]) -> RateLimiter:
        return self

    # -- the window, under the lock ---------------------------------------------------------------
    def _expire(self, now: float) -> None:
        edge = now - self.window
        stamps, uses = self._stamps, self._uses
        while stamps and stamps[0] <= edge:
            stamps.popleft()
        while uses and uses[0].t <= edge:
            use = uses.popleft()
            use.live = False
            self._window_tokens -= use.tokens

    def _delay(self, requests: int, tokens: int, now: float) -> float:
        """Seconds until the call fits (0: it fits now)."""
        if now < self._paused_until:
            return self._paused_until - now
        self._expire(now)
        tokens += self.excess
        wait = 0.0
        stamps = self._stamps
        if self.rpm is not None and len(stamps) + requests > self.rpm and stamps:
            # the oldest stamps that must leave the window first (all of them for an oversize call)
            k = min(len(stamps) + requests - self.rpm, len(stamps)) - 1
            wait = stamps[k] + self.window - now
        if self.tpm is not None and self._window_tokens + tokens > self.tpm and self._uses:
            excess = self._window_tokens + tokens - self.tpm
            freed = 0
            for use in self._uses:  # an oversize call waits for an empty window
                freed += use.tokens
                if freed >= excess or use is self._uses[-1]:
                    wait = max(wait, use.t + self.window - now)
                    break
        return max(wait, _MIN_WAIT) if wait > 0 else 0.0

    def _grant(self, requests: int, tokens: int, now: float) -> Slot:
        self._stamps.extend([now] * requests)
        use = _Use(now, tokens + self.excess, tokens)
        self._uses.append(use)
        self._window_tokens += use.tokens
        self.requests += requests
        if self.grants is not None:
            self.grants.extend([now] * requests)
        return Slot(now, requests, use)

    # -- public --------------------------------------------------------------------------------------
    def delay(self, requests: int, tokens: int) -> float:
        """Seconds a call of ``requests`` requests and ``tokens`` tokens would wait now."""
        with self._lock:
            return self._delay(requests, tokens, self.clock())

    def try_acquire(self, requests: int, tokens: int) -> Slot | None:
        """Take room for a call if it fits now (``None``: it would have to wait)."""
        with self._lock:
            now = self.clock()
            if self._delay(requests, tokens, now):
                return None
            return self._grant(requests, tokens, now)

    def acquire(self, requests: int, tokens: int) -> tuple[Slot, float]:
        """Take room for a call, sleeping while it does not fit; returns the slot and the seconds waited."""
        waited = 0.0
        while True:
            with self._lock:
                now = self.clock()
                wait = self._delay(requests, tokens, now)
                if not wait:
                    return self._grant(requests, tokens, now), self._waited(waited)
            self.sleep(wait)
            waited += max(0.0, self.clock() - now)

    async def aacquire(self, requests: int, tokens: int) -> tuple[Slot, float]:
        """Async twin of :meth:`acquire` (the task sleeps; cancelling it takes nothing)."""
        waited = 0.0
        asleep = self.asleep or asyncio.sleep
        while True:
            with self._lock:
                now = self.clock()
                wait = self._delay(requests, tokens, now)
                if not wait:
                    return self._grant(requests, tokens, now), self._waited(waited)
            await asleep(wait)
            waited += max(0.0, self.clock() - now)

    def _waited(self, seconds: float) -> float:
        if seconds > 0:
            self.waits += 1
            self.waited += seconds
        return seconds

    def settle(self, slot: Slot, tokens: int) -> None:
        """Correct the call's tokens to what the model reported (and learn how far beyond its
        estimate it went: see the module docstring)."""
        with self._lock:
            self.tokens += tokens
            use = slot.use
            if use.live:
                self._window_tokens += tokens - use.tokens
                use.tokens = tokens
            if tokens > 0:  # (a failed call reports nothing: it says nothing about answers)
                self._excesses.append(max(0, tokens - use.estimate))
                self.excess = min(max(self._excesses), self.tpm or 0)

    def refund(self, slot: Slot) -> None:
        """Give the room back (the call was answered from a cache, or never sent)."""
        with self._lock:
            self.requests -= slot.requests
            for _ in range(slot.requests):
                if slot.t in self._stamps:
                    self._stamps.remove(slot.t)
            if slot.use.live:
                slot.use.live = False
                self._uses.remove(slot.use)
                self._window_tokens -= slot.use.tokens
            if self.grants is not None:
                for _ in range(slot.requests):
                    self.grants.remove(slot.t)

    def pause(self, seconds: float) -> None:
        """The server said ``Retry-After: seconds``: no call starts before then, for at most
        :attr:`max_pause` seconds (a longer wait, or a value that is not a number of seconds, is
        logged, and a useless one is ignored)."""
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0:
            logger.warning("stageflow.rate_limit(%r): ignored a Retry-After of %r", self.model, seconds)
            return
        if seconds > self.max_pause:
            logger.warning(
                "stageflow.rate_limit(%r): the server asked to wait %s s (Retry-After); pausing the "
                "model's calls for max_pause=%s s instead",
                self.model,
                seconds,
                self.max_pause,
            )
            seconds = self.max_pause
        with self._lock:
            self._paused_until = max(self._paused_until, self.clock() + seconds)
            self.pauses += 1

    def close(self) -> None:
        """Stop limiting this model (if this limiter is still the one registered for it)."""
        with _REGISTRY_LOCK:
            if _REGISTRY.get(self.model) is self:
                del _REGISTRY[self.model]

    def __enter__(self) -> RateLimiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rate_limit(
    model: str,
    *,
    rpm: int | None = None,
    tpm: int | None = None,
    window: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Any] = time.sleep,
    asleep: Callable[[float], Any] | None = None,
    record: bool = False,
    max_pause: float = 60.0,
) -> RateLimiter:
    """Limit every LM call to ``model`` (the ``dspy.LM``'s model string) in this process.

    ``rpm`` requests and ``tpm`` tokens per ``window`` seconds (60). A ``Retry-After`` pauses the
    model's calls for at most ``max_pause`` seconds (60). Replaces a limiter already set for that
    model. Returns the :class:`RateLimiter` (its counters show what it did); use it as a
    context manager, or call ``.close()``, to lift the limit. ``clock``/``sleep``/``asleep`` are
    injectable for tests.

    Examples:
        >>> import stageflow
        >>> with stageflow.rate_limit("openai/gpt-4o-mini", rpm=500, tpm=200_000) as limiter:
        ...     limiter.rpm, "openai/gpt-4o-mini" in stageflow.budgets.rate_limits()
        (500, True)
        >>> "openai/gpt-4o-mini" in stageflow.budgets.rate_limits()
        False
    """
    from stageflow.budgets.intercept import install

    limiter = RateLimiter(
        model,
        rpm=rpm,
        tpm=tpm,
        window=window,
        clock=clock,
        sleep=sleep,
        asleep=asleep,
        record=record,
        max_pause=max_pause,
    )
    install()
    with _REGISTRY_LOCK:
        _REGISTRY[model] = limiter
    return limiter


def rate_limits() -> dict[str, RateLimiter]:
    """The limiters in force, by model."""
    with _REGISTRY_LOCK:
        return dict(_REGISTRY)


def limiter_for(model: str) -> RateLimiter | None:
    """The limiter of ``model``, if one is set (the model string exactly; a limiter set for the same
    name without its provider prefix is not it, and that is logged once)."""
    if not _REGISTRY:
        return None
    found = _REGISTRY.get(model)
    if found is None and "/" in model:
        _near_miss(model)
    return found


_WARNED: set[tuple[str, str]] = set()


def _near_miss(model: str) -> None:
    """A limiter named like ``model`` without its provider prefix holds nothing: say so, once."""
    bare = model.rsplit("/", 1)[-1]
    near = _REGISTRY.get(bare)
    if near is None or (bare, model) in _WARNED:
        return
    _WARNED.add((bare, model))
    logger.warning(
        "stageflow.rate_limit(%r) does not hold calls to the model %r: limits match lm.model exactly "
        "(use stageflow.rate_limit(%r, ...))",
        bare,
        model,
        model,
    )
