"""Which failures are transient, and how long a server asked us to wait before trying again.

DSPy classifies the LM errors of its own engines (``LMRateLimitError``, ``LMServerError``...). An
error DSPy could not classify reaches stageflow as ``LMUnexpectedError`` with the original
exception as its ``__cause__`` — a LiteLLM ``RateLimitError`` raised by a custom engine, an
``openai`` or ``httpx`` error raised by a hand-written client. :func:`is_retryable` looks through
that chain, so those are transient too. Third-party classes are recognised by module and class
name along their MRO: nothing is imported to classify an error.

Examples:
    >>> is_retryable(ConnectionError("reset by peer"))
    True
    >>> class ProviderError(Exception):
    ...     status_code = 503
    >>> is_retryable(ProviderError("upstream unavailable"))
    True
    >>> is_retryable(ValueError("bad input"))
    False
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime

from stageflow.errors import BudgetExceeded, StageTimeoutError

__all__ = ["causes", "explicit_causes", "is_kind", "is_retryable", "is_timeout", "retry_after"]

#: HTTP statuses worth another attempt: request timeout, too many requests, and server errors
#: other than "not implemented" and "HTTP version not supported".
_TRANSIENT_STATUS = frozenset({408, 429} | set(range(500, 600)) - {501, 505})

#: Transient exception classes of common client libraries, by top-level module and class name.
_TRANSIENT_CLASSES = frozenset(
    {
        ("litellm", "RateLimitError"),
        ("litellm", "ServiceUnavailableError"),
        ("litellm", "APIConnectionError"),
        ("litellm", "Timeout"),
        ("litellm", "InternalServerError"),
        ("litellm", "BadGatewayError"),
        ("openai", "APIConnectionError"),  # includes APITimeoutError
        ("openai", "RateLimitError"),
        ("openai", "InternalServerError"),
        ("anthropic", "APIConnectionError"),
        ("anthropic", "RateLimitError"),
        ("anthropic", "InternalServerError"),
        ("httpx", "TimeoutException"),
        ("httpx", "NetworkError"),
        ("httpx", "RemoteProtocolError"),
        ("requests", "ConnectionError"),
        ("requests", "Timeout"),
    }
)


#: Timeout exception classes of common client libraries (subclasses included), as above.
_TIMEOUT_CLASSES = frozenset(
    {
        ("litellm", "Timeout"),
        ("openai", "APITimeoutError"),
        ("anthropic", "APITimeoutError"),
        ("httpx", "TimeoutException"),
        ("requests", "Timeout"),
        ("aiohttp", "ServerTimeoutError"),
        ("dspy", "LMTimeoutError"),
    }
)


def is_timeout(error: BaseException) -> bool:
    """A timeout, by type: Python's ``TimeoutError`` (stageflow's and asyncio's included), the timeout
    classes of DSPy, LiteLLM, OpenAI, Anthropic, httpx, requests and aiohttp, or an HTTP 408 / 504.

    Examples:
        >>> is_timeout(TimeoutError()), is_timeout(ValueError("request timeout"))
        (True, False)
    """
    if isinstance(error, TimeoutError):
        return True
    for cls in type(error).__mro__:
        if (cls.__module__.partition(".")[0], cls.__name__) in _TIMEOUT_CLASSES:
            return True
    return _status(error) in (408, 504)


def is_kind(error: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether ``error``, or an error it was raised ``from``, is one of ``kinds``; where ``kinds``
    names ``TimeoutError`` itself, every timeout (:func:`is_timeout`) is one. An error raised while
    handling another (without ``from``) is not caused by it, and a budget refusal
    (:class:`~stageflow.BudgetExceeded`) is never taken for what it was raised from.

    Examples:
        >>> class ReadTimeout(Exception):
        ...     status_code = 408
        >>> is_kind(ReadTimeout(), (TimeoutError,)), is_kind(ReadTimeout(), (KeyError,))
        (True, False)
    """
    timeouts = TimeoutError in kinds
    for e in explicit_causes(error):
        if isinstance(e, kinds) or (timeouts and is_timeout(e)):
            return True
        if isinstance(e, BudgetExceeded):
            return False
    return False


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


def explicit_causes(error: BaseException) -> list[BaseException]:
    """``error`` and its ``raise ... from`` causes only (an error raised while handling another
    is not caused by it), innermost last."""
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__
    return chain


def _status(error: BaseException) -> int | None:
    """The HTTP status an error carries (``status_code``, ``status`` or ``response.status_code``)."""
    for value in (
        getattr(error, "status_code", None),
        getattr(error, "status", None),
        getattr(getattr(error, "response", None), "status_code", None),
    ):
        if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
            return value
    return None


def _known_transient(error: BaseException) -> bool:
    for cls in type(error).__mro__:
        if (cls.__module__.partition(".")[0], cls.__name__) in _TRANSIENT_CLASSES:
            return True
    return False


def _verdict(error: BaseException) -> bool | None:
    """``True``/``False`` when this link of the chain decides; ``None`` to look at its cause."""
    from dspy.utils.exceptions import LMError, LMUnexpectedError, is_retryable_lm_error

    if isinstance(error, TimeoutError | ConnectionError | StageTimeoutError):
        return True
    if isinstance(error, LMError) and not isinstance(error, LMUnexpectedError):
        # DSPy classified it (a billing or auth error stays final even when its cause was a 429).
        return bool(is_retryable_lm_error(error))
    if _known_transient(error):
        return True
    status = _status(error)
    if status is not None and status in _TRANSIENT_STATUS:
        return True
    return None


def is_retryable(error: BaseException) -> bool:
    """Transient failures: worth trying again after a short wait.

    Along ``error``'s chain of causes, the first of these decides:

    - ``TimeoutError``, ``ConnectionError`` and :class:`~stageflow.StageTimeoutError`: transient;
    - an LM error DSPy classified (anything but ``LMUnexpectedError``): DSPy's verdict
      (rate limits, server errors, timeouts, transport errors are transient; auth, billing and
      invalid requests are not);
    - LiteLLM's ``RateLimitError``, ``ServiceUnavailableError``, ``APIConnectionError``,
      ``Timeout``, ``InternalServerError``, ``BadGatewayError`` and their ``openai``,
      ``anthropic``, ``httpx`` and ``requests`` counterparts: transient;
    - an HTTP status (``status_code``, ``status`` or ``response.status_code``) of 408, 429 or 5xx
      (except 501 and 505): transient.

    Anything else is not.
    """
    for e in causes(error):
        verdict = _verdict(e)
        if verdict is not None:
            return verdict
    return False


def _headers(error: BaseException) -> Iterator[tuple[str, str]]:
    for source in (
        getattr(getattr(error, "response", None), "headers", None),
        getattr(error, "headers", None),
        getattr(error, "litellm_response_headers", None),
    ):
        items = getattr(source, "items", None)
        if not callable(items):
            continue
        try:
            pairs = [(str(k).lower(), str(v)) for k, v in items()]
        except Exception:  # a header object we cannot read gives no hint
            continue
        yield from pairs


def _header_seconds(name: str, value: str) -> float | None:
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        if name != "retry-after":
            return None
        try:
            when = parsedate_to_datetime(value)  # Retry-After: <HTTP-date>
        except (TypeError, ValueError, IndexError):
            return None
        return max(0.0, when.timestamp() - time.time())
    if name == "retry-after-ms":
        number /= 1000
    return number if math.isfinite(number) and number >= 0 else None


def _hint(error: BaseException) -> float | None:
    value = getattr(error, "retry_after", None)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0:
        return float(value)
    found = dict(_headers(error))
    for name in ("retry-after-ms", "retry-after"):
        if name in found:
            seconds = _header_seconds(name, found[name])
            if seconds is not None:
                return seconds
    return None


def retry_after(error: BaseException) -> float | None:
    """Seconds the server asked to wait, from the first error of the chain that says so.

    Read from a ``retry_after`` attribute (DSPy's LM errors) or from ``Retry-After-Ms`` /
    ``Retry-After`` response headers (seconds or an HTTP date) of an error such as LiteLLM's or
    httpx's. ``None`` when nothing says (negative, ``nan`` and unreadable values are ignored).

    Examples:
        >>> class Limited(Exception):
        ...     headers = {"Retry-After": "86400"}
        >>> retry_after(RuntimeError("no hint")) is None
        True
        >>> try:
        ...     raise RuntimeError("client wrapper") from Limited("429")
        ... except RuntimeError as e:
        ...     retry_after(e)
        86400.0
    """
    for e in causes(error):
        hinted = _hint(e)
        if hinted is not None:
            return hinted
    return None
