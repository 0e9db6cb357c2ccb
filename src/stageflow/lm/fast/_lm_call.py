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
their module at each call as DSPy reads them (so stageflow's budget interception applies).

This happens only when nothing can tell the difference (:func:`direct`): the LM's class has DSPy's
own ``__call__`` / ``acall`` (checked by code location the first time, then by identity) and the
instance replaces neither; DSPy's own ``prepare`` is in place; no DSPy callback is in force,
globally or on the LM (the wrapper would report the call to it); the keyword arguments are plain
(string keys, none of ``prompt``, ``messages``, ``request``, ``self``); and no ``rollout_id`` is in
play (its warning names the caller's frame). Otherwise the LM is called as DSPy calls it.

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

#: Keyword arguments that ``lm(messages=..., **kwargs)`` binds to a parameter (or refuses).
_BOUND = frozenset({"self", "prompt", "messages", "request"})


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
    attrs = getattr(lm, "__dict__", None)
    if attrs is None or "__call__" in attrs or "acall" in attrs:
        return False
    own = attrs.get("callbacks", getattr(cls, "callbacks", []))
    callbacks = setting("callbacks")
    if not (type(own) is list and not own and type(callbacks) is list and not callbacks):
        return False
    if type(lm_kwargs) is not dict or not _BOUND.isdisjoint(lm_kwargs):
        return False
    for key in lm_kwargs:
        if type(key) is not str:
            return False
    own_kwargs = getattr(lm, "kwargs", None)
    return (
        type(own_kwargs) is dict
        and own_kwargs.get("rollout_id") is None
        and lm_kwargs.get("rollout_id") is None
    )


def call(lm: Any, messages: Any, lm_kwargs: dict[str, Any]) -> Any:
    """``lm(messages=messages, **lm_kwargs)``."""
    if not direct(lm, lm_kwargs):
        return lm(messages=messages, **lm_kwargs)
    ex = _execution
    prepared = ex.prepare(lm, None, messages, lm_kwargs)
    _warn(lm, prepared, messages)
    return ex.finalize(lm, prepared, ex.execute(lm, prepared))


async def acall(lm: Any, messages: Any, lm_kwargs: dict[str, Any]) -> Any:
    """``await lm.acall(messages=messages, **lm_kwargs)``, its request prepared in line."""
    if not direct(lm, lm_kwargs):
        return await lm.acall(messages=messages, **lm_kwargs)
    ex = _execution
    prepared = ex.prepare(lm, None, messages, lm_kwargs, asynchronous=True)
    _warn(lm, prepared, messages)
    return ex.finalize(lm, prepared, await ex.aexecute(lm, prepared))


def _warn(lm: Any, prepared: Any, messages: Any) -> None:
    """DSPy's deprecation warnings of an LM call, as ``BaseLM.__call__`` gives them."""
    if not prepared.managed:
        _base_lm.warn_legacy_lm()
    _base_lm.warn_openai_messages(lm, messages)
