"""DSPy's LM call (``BaseLM.__call__`` / ``acall``, DSPy 3.4.1) as its steps, for the fast chat
adapter: the async call prepares its request in line instead of on a worker thread.

``await lm.acall(messages=...)`` in DSPy 3.4.1 runs ``execution.prepare`` through
``asyncio.to_thread`` before anything else. For a call made with ``messages`` (what an adapter
sends) that step reads no file and waits on nothing: it merges the LM's keyword arguments with the
call's, checks the text can be encoded and counts the completions asked for. The hop costs more
than the step: a round trip through the event loop's default executor (six threads on two cores),
and in a fan-out of LM stages hundreds of calls queue on it. (The hop is there for requests passed
as ``dspy.lm15.Request``, whose media snapshots may read local files.) :func:`acall` runs the same
steps with ``prepare`` in line; :func:`call` runs the sync steps without DSPy's callback wrapper.
Everything after preparation is DSPy's own ``execute`` / ``aexecute`` and ``finalize``, read from
their module at each call as DSPy reads them (so stageflow's budget interception applies), with
two of its steps done for less while they run: the messages → request conversion is kept per
prompt prefix (:mod:`._request`), and the async call prices its answer in line when that cannot
wait on the network (:mod:`._pricing`).

This happens only when nothing can tell the difference (:func:`direct`): the LM's class has DSPy's
own ``__call__`` / ``acall`` (checked by code location the first time, then by identity) and the
``acall`` an async call finds on the LM is that one, bound to it; DSPy's own ``prepare`` is in
place; no DSPy callback is in force, globally or on the LM (read as DSPy's callback wrapper reads
it: the wrapper would report the call); and the keyword arguments are a plain dict with string keys,
none of which the call binds to a parameter (``prompt``, ``messages``, ``request``, ``self``, the
wrapper's ``instance``); and no ``rollout_id`` warning may be due (it names DSPy's frame). Otherwise
the LM is called as DSPy calls it.

One difference remains by design: ``prepare`` runs on the thread that makes the async call (the
event loop's) instead of a worker thread. It does nothing there that waits.

Example:
    >>> import dspy
    >>> from stageflow.lm.fast._lm_call import direct
    >>> direct(dspy.utils.DummyLM([{"answer": "4"}]), {})
    True
    >>> direct(dspy.utils.DummyLM([{"answer": "4"}]), {"prompt": "hi"})
    False
"""

from __future__ import annotations

import importlib
from typing import Any

import dspy

from stageflow._callers import setting
from stageflow.lm.fast import _pricing, _request
from stageflow.lm.fast._watch import recheck

__all__ = ["acall", "call", "direct"]

_base_lm: Any = importlib.import_module("dspy.clients.base_lm")
_execution: Any = importlib.import_module("dspy.clients.execution")
_BaseLM = dspy.BaseLM
_WRAPPER = "dspy/utils/callback.py"

#: What :func:`direct` watches (see :mod:`~stageflow.lm.fast._watch`).
_WATCHED: tuple[tuple[Any, str, Any], ...] = (
    (
        _BaseLM,
        "__call__",
        (("with_callbacks.<locals>.sync_wrapper", _WRAPPER), ("BaseLM.__call__", "dspy/clients/base_lm.py")),
    ),
    (
        _BaseLM,
        "acall",
        (("with_callbacks.<locals>.async_wrapper", _WRAPPER), ("BaseLM.acall", "dspy/clients/base_lm.py")),
    ),
    (_execution, "prepare", (("prepare", "dspy/clients/execution.py"),)),
)

_SEEN: list[tuple[Any, ...] | None] = [None]


def _bound(*fns: Any) -> frozenset[str]:
    """The keyword names that calling ``fns`` (DSPy's callback wrapper and the method inside it)
    binds to a named parameter: ``lm(messages=..., **kwargs)`` refuses them in ``kwargs`` (or takes
    them for its own), and ``prepare`` takes ``request`` out."""
    names = {"request"}
    for fn in fns:
        code = fn.__code__
        names.update(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount])
    return frozenset(names)


#: Keyword arguments that ``lm(messages=..., **kwargs)`` / ``lm.acall(...)`` bind (or refuse).
_BOUND = _bound(_BaseLM.__call__, _BaseLM.__call__.__wrapped__, _BaseLM.acall, _BaseLM.acall.__wrapped__)


def _untouched() -> bool:
    seen = _SEEN[0]
    if (
        seen is not None
        and _BaseLM.__call__ is seen[0]
        and _BaseLM.acall is seen[1]
        and _execution.prepare is seen[2]
    ):
        return True
    return recheck(_SEEN, tuple(getattr(o, name, None) for o, name, _ in _WATCHED), _WATCHED)


def direct(lm: Any, lm_kwargs: dict[str, Any]) -> bool:
    """Whether ``lm(messages=..., **lm_kwargs)`` (and its async twin) may run as its steps here (see
    the module docstring)."""
    cls = type(lm)
    if not _untouched() or cls.__call__ is not _SEEN[0][0] or cls.acall is not _SEEN[0][1]:  # type: ignore[index]
        return False
    own = getattr(lm, "callbacks", [])  # (read as DSPy's callback wrapper reads it)
    callbacks = setting("callbacks")
    if not (type(own) is list and not own and type(callbacks) is list and not callbacks):
        return False
    if type(lm_kwargs) is not dict or not _BOUND.isdisjoint(lm_kwargs):
        return False
    if not all(type(key) is str for key in lm_kwargs):
        return False
    return not _may_warn_rollout(lm, lm_kwargs)


def _may_warn_rollout(lm: Any, lm_kwargs: dict[str, Any]) -> bool:
    """Whether ``prepare`` may give DSPy's ``rollout_id`` warning on this call: it names the frame
    two above it (DSPy's ``BaseLM.__call__``, or the worker thread's), so such a call is DSPy's.
    ``dspy.LM`` warns once per LM; an LM that warned already, or with no ``rollout_id`` in play, is
    direct. (The LM's ``kwargs`` is read from its ``__dict__``, so no property of yours runs twice.)"""
    if getattr(type(lm), "_warn_zero_temp_rollout", None) is None:
        return False
    attrs = getattr(lm, "__dict__", None)
    if type(attrs) is not dict:
        return True
    if attrs.get("_warned_zero_temp_rollout") is True:
        return False
    own = attrs.get("kwargs")
    return (
        type(own) is not dict or own.get("rollout_id") is not None or lm_kwargs.get("rollout_id") is not None
    )


def call(lm: Any, messages: Any, lm_kwargs: dict[str, Any]) -> Any:
    """``lm(messages=messages, **lm_kwargs)``."""
    if not direct(lm, lm_kwargs):
        return lm(messages=messages, **lm_kwargs)
    ex = _execution
    prepared = ex.prepare(lm, None, messages, lm_kwargs)
    _warn(lm, prepared, messages)
    if not _request.installed():
        _request.install()
    token = _request.sending.set(messages)
    try:
        result = ex.execute(lm, prepared)
    finally:
        _request.sending.reset(token)
    return ex.finalize(lm, prepared, result)


async def acall(lm: Any, messages: Any, lm_kwargs: dict[str, Any]) -> Any:
    """``await lm.acall(messages=messages, **lm_kwargs)``, its request prepared in line."""
    method = lm.acall  # (looked up once, as DSPy's adapter does: one set on the instance wins)
    if (
        not direct(lm, lm_kwargs)
        or getattr(method, "__func__", None) is not _SEEN[0][1]  # type: ignore[index]
        or getattr(method, "__self__", None) is not lm
    ):
        return await method(messages=messages, **lm_kwargs)
    ex = _execution
    prepared = ex.prepare(lm, None, messages, lm_kwargs, asynchronous=True)
    _warn(lm, prepared, messages)
    if not _request.installed():
        _request.install()
    if not _pricing.installed():
        _pricing.install()
    token = _request.sending.set(messages)
    try:
        result = await ex.aexecute(lm, prepared)
    finally:
        _request.sending.reset(token)
    return ex.finalize(lm, prepared, result)


def _warn(lm: Any, prepared: Any, messages: Any) -> None:
    """DSPy's deprecation warnings of an LM call, as ``BaseLM.__call__`` gives them."""
    if not prepared.managed:
        _base_lm.warn_legacy_lm()
    _base_lm.warn_openai_messages(lm, messages)
