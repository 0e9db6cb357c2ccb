"""What one LM call may use, read from the call before it is sent: the budgets' reservation.

- **Prompt tokens**: the prompt's UTF-8 byte count plus a few tokens per message for the chat
  template — an upper bound (no byte-level tokenizer makes more tokens than bytes).
- **Completion tokens**: the call's ``max_tokens``. That is an upper bound only when something stops
  the model there: DSPy's own engines (lm15 and LiteLLM) send it to the provider, which stops at it;
  a custom engine (a local model, a test double) is trusted only when it says so with a class
  attribute ``enforces_max_tokens = True``. A call with no ``max_tokens`` has no bound.
- **Cost**: an upper bound when the completion is bounded and the model's prices are in DSPy's price
  table (``dspy.clients.model_metadata``, the table DSPy prices calls from): prompt bound × the
  dearest input rate + ``max_tokens`` × the dearest output rate the entry lists.

Where there is no bound, :mod:`.calibrate` makes the budget careful instead.

Examples:
    >>> from stageflow.testing import FakeLM
    >>> enforces_max_tokens(FakeLM(max_tokens=5)), enforces_max_tokens(FakeLM(enforce_max_tokens=True))
    (False, True)
    >>> prices(FakeLM()) is None  # a custom engine: DSPy prices nothing for it
    True
"""

from __future__ import annotations

import math
import threading
from typing import Any

__all__ = ["enforces_max_tokens", "max_tokens", "price_known", "prices", "prompt_size"]

_PER_MESSAGE = 8  # chat-template tokens a message may add beyond its text
_PRICES: dict[str, tuple[float, float] | None] = {}  # by model string; None: not priced
_PRICES_LOCK = threading.Lock()


def _size(value: Any, out: list[int]) -> None:
    """Add the UTF-8 bytes and the characters of every string in ``value`` to ``out``."""
    if isinstance(value, str):
        n = len(value)
        out[0] += n if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
        out[1] += n
    elif isinstance(value, dict):
        for v in value.values():
            _size(v, out)
    elif isinstance(value, list | tuple):
        for v in value:
            _size(v, out)
    elif value is not None and not isinstance(value, int | float | bool):
        _size(repr(value), out)  # a response_format type, tools, media: their text bounds what is sent


def _messages_size(messages: Any, out: list[int]) -> None:
    """:func:`_size` for a list of chat messages, with the usual ``{"role", "content": str}`` inline."""
    for message in messages:
        if isinstance(message, dict) and len(message) == 2 and isinstance(message.get("content"), str):
            text = message["content"]
            n = len(text)
            out[0] += (n if text.isascii() else len(text.encode("utf-8", "surrogatepass"))) + 16
            out[1] += n
        else:
            _size(message, out)


def prompt_size(call: Any) -> tuple[int, int]:
    """(an upper bound on the prompt's tokens, its characters) for a DSPy execution call."""
    sizes = [0, 0]
    if call.request is not None:
        _size(call.request, sizes)
        return sizes[0] + _PER_MESSAGE * (len(call.request.messages) + 1), sizes[1]
    legacy = call.legacy
    messages = legacy.get("messages") or ()
    _messages_size(messages, sizes)
    for key in ("tools", "response_format", "functions"):
        if legacy.get(key) is not None:
            _size(legacy[key], sizes)
    return sizes[0] + _PER_MESSAGE * (len(messages) + 1), sizes[1]


def max_tokens(call: Any) -> int | None:
    """The completion tokens the call asks for at most, or ``None`` when it sets no limit."""
    if call.request is not None:
        value = call.request.config.max_tokens
    else:
        value = call.legacy.get("max_tokens") or call.legacy.get("max_completion_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def enforces_max_tokens(lm: Any) -> bool:
    """Whether the model stops at the ``max_tokens`` it is sent (so it bounds the completion).

    ``True`` for a ``dspy.LM`` on DSPy's own engines (the provider enforces it) and for a custom
    engine whose class declares ``enforces_max_tokens = True``; ``False`` otherwise (a legacy
    ``BaseLM.forward`` or a custom engine may ignore it).
    """
    spec = getattr(lm, "_engine_spec", None)  # dspy.LM: "auto" / "lm15" / "litellm", or an engine
    if spec is None:
        return False
    if isinstance(spec, str):
        return True
    return getattr(spec, "enforces_max_tokens", False) is True


def price_known(lm: Any) -> bool:
    """Whether :func:`prices` has an answer for ``lm`` without loading the price table."""
    return str(getattr(lm, "model", "")) in _PRICES or not isinstance(getattr(lm, "_engine_spec", None), str)


def prices(lm: Any) -> tuple[float, float] | None:
    """(the dearest input rate, the dearest output rate) per token for ``lm``'s model in DSPy's price
    table, or ``None`` (a custom engine, an unknown model, an entry without token prices).

    The first look-up of a model loads DSPy's price table (DSPy does the same when it first prices a
    call); the answer is kept for the process.
    """
    spec = getattr(lm, "_engine_spec", None)
    if not isinstance(spec, str):
        return None  # a custom engine: DSPy reports no cost for it either
    model = str(lm.model)
    with _PRICES_LOCK:
        if model in _PRICES:
            return _PRICES[model]
    found = _lookup(lm)
    with _PRICES_LOCK:
        _PRICES[model] = found
    return found


def _lookup(lm: Any) -> tuple[float, float] | None:
    try:
        from dspy.clients.capabilities import resolve
        from dspy.clients.model_metadata import model_info

        route = resolve(lm)
        info = model_info(route.provider, route.model)
    except Exception:  # an unresolvable model: not priced (DSPy then reports no cost either)
        return None
    rates: dict[str, list[float]] = {"input": [], "output": []}
    for key, value in info.items():
        if "cost" not in key or "token" not in key:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if not math.isfinite(value) or value < 0:
            continue
        side = "input" if "input" in key else "output" if "output" in key else None
        if side is not None:
            rates[side].append(float(value))
    if not rates["input"] or not rates["output"]:
        return None
    return max(rates["input"]), max(rates["output"])
