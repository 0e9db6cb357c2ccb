"""stageflow's context in DSPy's own worker threads.

``stageflow.limits(...)``, ``profile()``, ``trace()`` and hooks live in context variables. Python
does not copy context variables into the threads of a pool, so a pipeline that ``dspy.Evaluate``,
``dspy.Parallel`` or an optimizer calls from its worker threads would run without them: a cap of 2
allowed 6 concurrent calls, a profile recorded nothing. DSPy *does* copy its own settings overrides
into those threads. So each of stageflow's context managers also publishes a snapshot of the carried
variables there (:func:`publish`), and a pipeline call that finds a snapshot its own context has not
seen adopts it for the duration of the call (:func:`adopt` / :func:`release`).

A snapshot is adopted only where it is new: in the thread that entered the context manager the
variables already hold those values (and the engine's own, finer settings made since — a fan-out's
cap — are kept).

Examples:
    >>> from contextvars import ContextVar
    >>> level = carried(ContextVar("doc_level", default=0))
    >>> token = level.set(3)
    >>> snapshot = {level: level.get()}
    >>> level.reset(token)
    >>> tokens = adopt_snapshot(snapshot)
    >>> level.get()
    3
    >>> release(tokens)
    >>> level.get()
    0
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar, Token
from typing import Any, TypeVar

__all__ = ["adopt", "adopt_snapshot", "carried", "publish", "release", "visible"]

_T = TypeVar("_T")
_REGISTRY: list[ContextVar[Any]] = []
#: The key of the snapshot in DSPy's settings overrides (copied into DSPy's worker threads).
_KEY = "stageflow_context"
# The snapshot this context holds the values of (published or adopted here).
_SEEN: ContextVar[object | None] = ContextVar("stageflow_context_seen", default=None)
_Tokens = list[tuple[ContextVar[Any], Token[Any]]]


def carried(var: ContextVar[_T]) -> ContextVar[_T]:
    """Register ``var`` as part of the context that crosses into DSPy's worker threads."""
    _REGISTRY.append(var)
    return var


def _settings_module() -> Any:
    # Only when DSPy is loaded: no DSPy thread can start before it is, and `import stageflow` must
    # not import DSPy.
    return sys.modules.get("dspy.dsp.utils.settings")


@contextlib.contextmanager
def publish() -> Iterator[None]:
    """Make the carried variables' current values reach DSPy's worker threads inside the block.

    Called by stageflow's context managers right after they set their variable.
    """
    settings_module = _settings_module()
    if settings_module is None:
        yield
        return
    snapshot = {var: var.get() for var in _REGISTRY}
    overrides = settings_module.thread_local_overrides
    new = settings_module.dotdict(overrides.get())
    new[_KEY] = snapshot
    dspy_token = overrides.set(new)
    seen_token = _SEEN.set(snapshot)
    try:
        yield
    finally:
        _SEEN.reset(seen_token)
        overrides.reset(dspy_token)


def adopt() -> _Tokens | None:
    """At the start of a pipeline call: take over a snapshot published in another thread (DSPy's
    worker threads carry it in their settings). Returns what :func:`release` undoes, or ``None``."""
    settings_module = _settings_module()
    if settings_module is None:
        return None
    snapshot = settings_module.thread_local_overrides.get().get(_KEY)
    if snapshot is None or _SEEN.get() is snapshot:
        return None
    return adopt_snapshot(snapshot)


def visible(var: ContextVar[_T]) -> _T:
    """``var``'s value here, counting a snapshot DSPy carried into this thread that no pipeline call
    adopted (an LM call made directly in a ``dspy.Parallel`` worker thread)."""
    settings_module = _settings_module()
    if settings_module is not None:
        snapshot = settings_module.thread_local_overrides.get().get(_KEY)
        if snapshot is not None and _SEEN.get() is not snapshot and var in snapshot:
            return snapshot[var]  # type: ignore[no-any-return]
    return var.get()


def adopt_snapshot(snapshot: dict[ContextVar[Any], Any]) -> _Tokens:
    """Set every variable of ``snapshot`` to its value; :func:`release` restores them."""
    tokens: _Tokens = [(var, var.set(value)) for var, value in snapshot.items()]
    tokens.append((_SEEN, _SEEN.set(snapshot)))
    return tokens


def release(tokens: _Tokens | None) -> None:
    """Undo :func:`adopt`."""
    if tokens:
        for var, token in reversed(tokens):
            var.reset(token)
