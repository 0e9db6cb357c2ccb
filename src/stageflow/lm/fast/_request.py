"""DSPy's messages → request conversion for the fast adapter's LM calls, done once per prompt
prefix instead of once per call.

DSPy 3.4.1 turns the messages an adapter sends into an lm15 ``Request`` on every LM call
(``execution._canonical`` → ``request_from_openai_chat``): it reads every message, the
generation settings and the model's dialect again, ~30 µs of CPU per call, a quarter of a fast
``Predict`` stage's. Of all that, only the last message, the user's, changes from one call of a
predictor to the next: the system message, the demos and the settings depend on the signature,
the demos and the LM.

While the fast adapter's LM call runs (:func:`sending`), the conversion of *its* messages (the
same list object) is looked up by everything but the last message's text: the model and settings,
the dialect, and every earlier message's role and text. The first call with a new prefix is
DSPy's conversion, kept. A later call with that prefix builds its ``Request`` from the kept one,
with a user message of its own text (:func:`_rebuilt`). What is kept has its last message's text
taken out (earlier messages are the prefix: the system message, the demos, and with a
``dspy.History`` input a conversation's earlier turns, kept with it for at most 1,024 prefixes), and
is checked when it is kept: rebuilt with the call's own text it must equal DSPy's conversion, or
that prefix always goes to DSPy's.

Only calls whose messages are all ``{"role": ..., "content": <str>}``, the last one the user's,
and whose settings are plain scalars (text, numbers, booleans, ``None``) are looked up; the kept
request must carry no tools, extensions or response format (objects DSPy's engines could change
in place). Anything else, conversions made while no fast adapter call runs, and a conversion
replaced by someone else (``request_from_openai_chat`` or a function it runs through) go to DSPy's
own code. An LM call your own LM makes inside the fast adapter's call with that call's very
messages list (a router passing them on) is looked up too: it gets the same request.

The requests built from a kept one share its frozen parts (the settings, the system text, earlier
messages) with each other, as lm15's ``dataclasses.replace`` would. An engine that changes the
request it receives in place, past lm15's frozen dataclasses (``object.__setattr__``), would change
the later requests of that prefix too; engines must treat requests as the immutable values they
are.

Example:
    >>> from stageflow.lm.fast import _request
    >>> _request.prefix_key({"model": "m", "messages": None, "temperature": 0.0},
    ...     [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}], None)
    (None, ('model', <class 'str'>, 'm', 'temperature', <class 'float'>, '0.0'), ('system', 'S'))
    >>> _request.prefix_key({"model": "m", "messages": None, "tools": []},
    ...     [{"role": "user", "content": "hi"}], None) is None
    True
"""

from __future__ import annotations

import dataclasses
import importlib
import threading
from contextvars import ContextVar
from typing import Any

from stageflow.lm.fast._watch import is_dspys, recheck

__all__ = ["install", "installed", "prefix_key", "sending", "uninstall"]

_execution: Any = importlib.import_module("dspy.clients.execution")
_openai_chat: Any = importlib.import_module("dspy._vendor.lm15.providers.openai_chat")
_DSPYS = (("request_from_openai_chat", "dspy/_vendor/lm15/providers/openai_chat.py"),)

#: The messages list of the fast adapter's LM call running here (None otherwise).
sending: ContextVar[list[Any] | None] = ContextVar("stageflow_fast_messages", default=None)

_SCALARS = frozenset({str, int, bool, type(None)})
_LIMIT = 1024  # prefixes kept; all are dropped when a new one would exceed it

#: prefix key → DSPy's request for it with an empty user text, or _DSPY (the prefix is DSPy's)
_KEPT: dict[Any, Any] = {}
_DSPY = object()
_STATE: list[Any] = [None, None]  # [DSPy's conversion, the wrapper] while installed
_LOCK = threading.Lock()


def prefix_key(body: Any, rows: Any, compat: Any) -> tuple[Any, ...] | None:
    """What a conversion of ``body`` (its messages ``rows``) depends on besides the last message's
    text, or ``None`` when the call is not of the shape this module looks up."""
    if type(rows) is not list or not rows:
        return None
    last = rows[-1]
    if (
        type(last) is not dict
        or len(last) != 2
        or last.get("role") != "user"
        or type(last.get("content")) is not str
    ):
        return None
    if compat is not None and type(compat) is not str:
        return None  # (a dialect object: DSPy's conversion, as its equality is not ours to trust)
    settings: list[Any] = []
    for name, value in body.items():
        if name == "messages":
            continue
        kind = type(value)
        if kind is float:
            value = repr(value)  # (0.0 and -0.0 are equal, and are sent as written)
        elif kind not in _SCALARS:
            return None
        settings += (name, kind, value)
    prefix: list[Any] = []
    for row in rows[:-1]:
        if type(row) is not dict or len(row) != 2:
            return None
        role, text = row.get("role"), row.get("content")
        if type(role) is not str or type(text) is not str:
            return None
        prefix += (role, text)
    return (compat, tuple(settings), tuple(prefix))


def _rebuilt(kept: Any, text: str) -> Any:
    """``kept`` with a last (user) message of ``text``.

    Built as copies of ``kept``'s own objects with one field replaced each (lm15's request, message
    and text part are frozen dataclasses): their constructors' checks passed for ``kept`` and
    cannot fail for another text (:func:`prefix_key` took only a ``str``), and a field lm15 adds
    later is copied too. The first use of a kept request checks the build reproduces it."""
    last = kept.messages[-1]
    part = _copy(last.parts[0], "text", text)
    return _copy(kept, "messages", (*kept.messages[:-1], _copy(last, "parts", (part,))))


_FIELDS: dict[type, tuple[str, ...]] = {}
_set = object.__setattr__


def _copy(obj: Any, name: str, value: Any) -> Any:
    """A copy of the frozen dataclass ``obj`` with ``name`` set to ``value`` (no constructor run)."""
    cls = type(obj)
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    new = object.__new__(cls)
    for field in names:
        _set(new, field, getattr(obj, field))
    _set(new, name, value)
    return new


def _reusable(request: Any) -> bool:
    """Whether ``request`` holds nothing an engine could change in place (then it is shared)."""
    config = request.config
    last = request.messages[-1] if request.messages else None
    return (
        not request.tools
        and config.extensions is None
        and config.response_format is None
        and last is not None
        and last.role == "user"
        and len(last.parts) == 1
        and not last.continuation
        and not last.parts[0].continuation
    )


def _convert(body: Any, *, compat: Any = None) -> Any:
    """DSPy's ``request_from_openai_chat``, looked up for the fast adapter's calls (see above)."""
    original = _STATE[0]
    rows = sending.get()
    if rows is None or type(body) is not dict or rows is not body.get("messages") or not _untouched():
        return original(body, compat=compat)
    key = prefix_key(body, rows, compat)
    if key is None:
        return original(body, compat=compat)
    text: str = body["messages"][-1]["content"]  # (the call's user text: prefix_key took a str)
    kept: Any = _KEPT.get(key)
    if kept is None:
        request = original(body, compat=compat)
        _keep(key, request, text)
        return request
    if kept is _DSPY:
        return original(body, compat=compat)
    return _rebuilt(kept, text)


def _keep(key: tuple[Any, ...], request: Any, text: str) -> None:
    """Keep DSPy's ``request`` for its prefix, its last message's text taken out, if rebuilt with
    that text it is ``request`` again; otherwise the prefix is DSPy's."""
    kept: Any = _DSPY
    if _reusable(request):
        blank = _rebuilt(request, "")
        if _rebuilt(blank, text) == request:
            kept = blank
    if len(_KEPT) >= _LIMIT:
        _KEPT.clear()
    _KEPT[key] = kept


#: The functions DSPy's conversion runs through, watched as :mod:`._watch` describes: one of them
#: replaced (a patch of yours) sends every call to DSPy's conversion, so the patch sees each.
_WATCHED: tuple[tuple[Any, str, Any], ...] = tuple(
    (_openai_chat, name, ((name, f"dspy/_vendor/lm15/{where}.py"),))
    for name, where in (
        ("_ingest_openai_chat", "providers/openai_chat"),
        ("_ingest_messages", "providers/openai_chat"),
        ("_ingest_content_blocks", "providers/openai_chat"),
        ("_ingest_config", "providers/openai_chat"),
        ("resolve_openai_chat_compat", "compat"),
    )
)
_SEEN: list[tuple[Any, ...] | None] = [None]


def _untouched() -> bool:
    seen = _SEEN[0]
    m = _openai_chat
    if (
        seen is not None
        and m._ingest_openai_chat is seen[0]
        and m._ingest_messages is seen[1]
        and m._ingest_content_blocks is seen[2]
        and m._ingest_config is seen[3]
        and m.resolve_openai_chat_compat is seen[4]
    ):
        return True
    return recheck(_SEEN, tuple(getattr(o, name, None) for o, name, _ in _WATCHED), _WATCHED)


def installed() -> bool:
    """Whether DSPy's conversion is wrapped (and still is: a replacement of yours is left alone)."""
    wrapper = _STATE[1]
    return wrapper is not None and _execution.request_from_openai_chat is wrapper


def install() -> bool:
    """Wrap DSPy's conversion, if it is DSPy's own; whether it is wrapped now."""
    if installed():
        return True
    with _LOCK:
        found = _execution.request_from_openai_chat
        if found is _STATE[1] and found is not None:
            return True
        if not is_dspys(found, _DSPYS):
            return False
        _STATE[:] = [found, _convert]
        _KEPT.clear()
        _execution.request_from_openai_chat = _convert
        return True


def uninstall() -> None:
    """Give DSPy its conversion back (for benchmarks that measure DSPy untouched)."""
    with _LOCK:
        if installed():
            _execution.request_from_openai_chat = _STATE[0]
        _STATE[1] = None  # (DSPy's stays in _STATE[0] for a wrapper someone kept a reference to)
        _KEPT.clear()
