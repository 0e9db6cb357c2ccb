"""DSPy's chat adapter call (``ChatAdapter.__call__`` around ``Adapter.__call__``, DSPy 3.4.1) with
its scopes set directly, for the fast chat adapter.

A call of ``dspy.ChatAdapter`` enters three generator context managers — the JSON-fallback progress
scope, the capability-planning scope and the marker that tells the LM the OpenAI-style messages
come from an adapter — and calls ``format`` and ``parse`` through DSPy's callback wrappers, which
look up the callbacks in force. On a fast LM that plumbing is about 4 µs per call. :func:`enter` and
:func:`leave` set and reset the same context variables with the same values, in the same order;
:func:`unwrapped` gives ``format`` / ``parse`` without the wrapper when the wrapper would call them
directly (no callback in force, global or on the adapter).

This applies only while what it reproduces is DSPy's own: :func:`untouched` checks, on every call,
that the two call methods, the three context managers, their context variables and what they build
are the objects DSPy defines (by code location the first time, so a patch made before stageflow was
imported is seen too). Otherwise the fast adapter calls DSPy's code, patch and all.

The fast JSON adapter's call is ``JSONAdapter.__call__`` around the chat call: the planning scope
(:func:`enter_planning`), the response format chosen inside it, then the chat call, whose planning
scope is the same one (DSPy's nested scope reuses it). :func:`json_untouched` checks that
``JSONAdapter``'s call methods are DSPy's own as well.

Example:
    >>> import dspy
    >>> from stageflow.lm.fast._adapter_call import untouched
    >>> untouched()
    True
"""

from __future__ import annotations

import importlib
from typing import Any

import dspy

from stageflow._callers import setting
from stageflow.lm.fast._watch import recheck

__all__ = [
    "enter",
    "enter_planning",
    "json_format_untouched",
    "json_untouched",
    "leave",
    "leave_planning",
    "mark",
    "prepare_async",
    "unmark",
    "untouched",
    "unwrapped",
]

_call_context: Any = importlib.import_module("dspy.clients.call_context")
_capabilities: Any = importlib.import_module("dspy.clients.capabilities")
_deprecation: Any = importlib.import_module("dspy.clients._deprecation")
_chat_module: Any = importlib.import_module("dspy.adapters.chat_adapter")
_base_module: Any = importlib.import_module("dspy.adapters.base")

_ChatAdapter = dspy.ChatAdapter
_Adapter = dspy.Adapter

_CM = ("contextmanager.<locals>.helper", "contextlib.py")

#: What :func:`untouched` watches, as ``(owner, attribute, expected)`` (see
#: :mod:`~stageflow.lm.fast._watch`): ``expected`` is where DSPy's own function's code is (and, for a
#: decorated function, where the function inside is), or the object itself.
_WATCHED: tuple[tuple[Any, str, Any], ...] = (
    (_ChatAdapter, "__call__", (("ChatAdapter.__call__", "dspy/adapters/chat_adapter.py"),)),
    (_ChatAdapter, "acall", (("ChatAdapter.acall", "dspy/adapters/chat_adapter.py"),)),
    (
        _Adapter,
        "__call__",
        (
            ("with_capability_planning.<locals>.wrapper", "dspy/clients/capabilities.py"),
            ("Adapter.__call__", "dspy/adapters/base.py"),
        ),
    ),
    (
        _Adapter,
        "acall",
        (
            ("with_capability_planning.<locals>.async_wrapper", "dspy/clients/capabilities.py"),
            ("Adapter.acall", "dspy/adapters/base.py"),
        ),
    ),
    (
        _chat_module,
        "adapter_fallback_scope",
        (_CM, ("adapter_fallback_scope", "dspy/clients/call_context.py")),
    ),
    (_base_module, "adapter_message_call", (_CM, ("adapter_message_call", "dspy/clients/_deprecation.py"))),
    (_capabilities, "planning_scope", (_CM, ("planning_scope", "dspy/clients/capabilities.py"))),
    (_capabilities, "prepare_async", (("prepare_async", "dspy/clients/capabilities.py"),)),
    (_call_context, "_adapter_calls", _call_context._adapter_calls),
    (_call_context, "StreamProgress", _call_context.StreamProgress),
    (_capabilities, "_planning", _capabilities._planning),
    (_capabilities, "_PlanningScope", _capabilities._PlanningScope),
    (_deprecation, "_adapter_call", _deprecation._adapter_call),
)


_JSONAdapter = dspy.JSONAdapter

#: What :func:`json_untouched` watches: ``JSONAdapter``'s call methods inside their planning wrapper.
_JSON_WATCHED: tuple[tuple[Any, str, Any], ...] = (
    (
        _JSONAdapter,
        "__call__",
        (
            ("with_capability_planning.<locals>.wrapper", "dspy/clients/capabilities.py"),
            ("JSONAdapter.__call__", "dspy/adapters/json_adapter.py"),
        ),
    ),
    (
        _JSONAdapter,
        "acall",
        (
            ("with_capability_planning.<locals>.async_wrapper", "dspy/clients/capabilities.py"),
            ("JSONAdapter.acall", "dspy/adapters/json_adapter.py"),
        ),
    ),
)
_JSON_SEEN: list[tuple[Any, ...] | None] = [None]


def _methods() -> tuple[Any, ...]:
    """What :func:`untouched` looks at now (in the order of :data:`_WATCHED`)."""
    return tuple(getattr(owner, name, None) for owner, name, _ in _WATCHED)


#: What was last found to be DSPy's own (compared by identity on each call; kept, so no identity is
#: reused).
_SEEN: list[tuple[Any, ...] | None] = [None]


def untouched() -> bool:
    """Whether the adapter call's methods, context managers and context variables are DSPy's own."""
    seen = _SEEN[0]
    if (  # (the common case: what was found to be DSPy's own last time; _WATCHED, written out)
        seen is not None
        and _ChatAdapter.__call__ is seen[0]  # (a function read from its class: itself)
        and _ChatAdapter.acall is seen[1]
        and _Adapter.__call__ is seen[2]
        and _Adapter.acall is seen[3]
        and _chat_module.adapter_fallback_scope is seen[4]
        and _base_module.adapter_message_call is seen[5]
        and _capabilities.planning_scope is seen[6]
        and _capabilities.prepare_async is seen[7]
        and _call_context._adapter_calls is seen[8]
        and _call_context.StreamProgress is seen[9]
        and _capabilities._planning is seen[10]
        and _capabilities._PlanningScope is seen[11]
        and _deprecation._adapter_call is seen[12]
    ):
        return True
    return recheck(_SEEN, _methods(), _WATCHED)


def json_untouched() -> bool:
    """Whether ``JSONAdapter.__call__`` / ``acall`` are DSPy's own (for the fast JSON adapter,
    which also needs :func:`untouched`)."""
    seen = _JSON_SEEN[0]
    if seen is not None and _JSONAdapter.__call__ is seen[0] and _JSONAdapter.acall is seen[1]:
        return True
    return recheck(_JSON_SEEN, (_JSONAdapter.__call__, _JSONAdapter.acall), _JSON_WATCHED)


_FORMAT_WATCHED: tuple[tuple[Any, str, Any], ...] = (
    (
        _JSONAdapter,
        "_prepare_response_format",
        (("JSONAdapter._prepare_response_format", "dspy/adapters/json_adapter.py"),),
    ),
)
_FORMAT_SEEN: list[tuple[Any, ...] | None] = [None]


def json_format_untouched() -> bool:
    """Whether ``JSONAdapter._prepare_response_format`` is DSPy's own (the fast JSON adapter builds
    the structured-output format once per signature only then)."""
    seen = _FORMAT_SEEN[0]
    found = _JSONAdapter._prepare_response_format
    if seen is not None and found is seen[0]:
        return True
    return recheck(_FORMAT_SEEN, (found,), _FORMAT_WATCHED)


def enter_planning(lm: Any, lm_kwargs: Any) -> Any:
    """``planning_scope(lm, lm_kwargs)``, entered: its token, or ``None`` when the call is nested in
    a scope for the same LM and keyword arguments (DSPy's scope reuses it then)."""
    planning = _capabilities._planning
    current = planning.get()
    if current is not None and current.lm is lm and current.options is lm_kwargs:
        return None
    return planning.set(_capabilities._PlanningScope(lm, lm_kwargs))


def enter(lm: Any, lm_kwargs: Any) -> tuple[Any, Any, Any]:
    """``adapter_fallback_scope()`` then ``planning_scope(lm, lm_kwargs)``, entered: ``(progress,
    fallback token, planning token or None)``. Only while :func:`untouched`."""
    calls = _call_context._adapter_calls
    progress = _call_context.StreamProgress()
    outer = calls.set((*calls.get(), progress))
    return progress, outer, enter_planning(lm, lm_kwargs)


def leave_planning(token: Any) -> None:
    """Leave the planning scope :func:`enter` entered (before the JSON fallback, as DSPy does)."""
    if token is not None:
        _capabilities._planning.reset(token)


def leave(outer: Any) -> None:
    """Leave the fallback scope :func:`enter` entered."""
    _call_context._adapter_calls.reset(outer)


def mark(lm: Any, messages: Any) -> Any:
    """``adapter_message_call(lm, messages)``, entered; returns the token for :func:`unmark`."""
    return _deprecation._adapter_call.set((lm, messages))


def unmark(token: Any) -> None:
    _deprecation._adapter_call.reset(token)


async def prepare_async(lm: Any) -> None:
    """DSPy's capability preparation of an async adapter call (run inside the planning scope)."""
    await _capabilities.prepare_async(lm)


def unwrapped(adapter: Any, name: str, wrapper: Any) -> Any:
    """``adapter.<name>`` (``format`` or ``parse``) as DSPy's callback wrapper would run it now:
    the function inside ``wrapper`` (the wrapper DSPy put on the fast class) when no callback is in
    force and neither the adapter nor a subclass replaced it; otherwise the method as it is."""
    if (
        setting("callbacks") == []
        and adapter.__dict__.get("callbacks") == []
        and name not in adapter.__dict__
        and getattr(type(adapter), name) is wrapper
    ):
        return wrapper.__wrapped__.__get__(adapter)
    return getattr(adapter, name)
