"""stageflow's fan-outs under ``dspy.streamify``.

**Threads.**
``dspy.streamify`` runs a sync program in an AnyIO worker thread, and DSPy's sync LM code sends each
chunk with ``anyio.from_thread.run(...)``, which finds its way back to the event loop through a
thread-local token that only AnyIO's own worker threads have. Stages that stageflow runs on its
pool (``ForEach`` items, parallel branches, sync stages of an async call) would fail with "Not
running inside an AnyIO worker thread". The thread that starts such work takes the token it can see
(:func:`loop_token`) and the pool thread holds it while the work runs (:func:`lending`).

Nothing happens unless AnyIO is loaded and a token exists (that is, only while streaming).

**Listeners.** A DSPy ``StreamListener`` follows one predictor and parses field boundaries from its
chunks as they come; two concurrent calls of the *same* predictor would interleave their chunks
and garble (or lose) the stream. While listeners are active (:func:`listening`), a ``ForEach`` —
the one pattern that runs one stage many times at once — runs its items one after another, so
every item's chunks arrive whole and in order.

Examples:
    >>> loop_token() is None  # not inside an AnyIO worker thread or event loop
    True
    >>> with lending(None):
    ...     pass
    >>> listening()
    False
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

__all__ = ["lending", "listening", "loop_token"]

_MISSING = object()


def loop_token() -> Any:
    """The AnyIO event-loop token this thread can reach, or ``None``.

    In an AnyIO worker thread it is the thread's own token; on a running event loop it is that
    loop's token, but only while DSPy streams (``settings.send_stream`` is set) — other async calls
    never pay for it.
    """
    eventloop = sys.modules.get("anyio._core._eventloop")
    if eventloop is None:
        return None
    token = getattr(eventloop.threadlocals, "current_token", None)
    if token is not None:
        return token
    settings_module = sys.modules.get("dspy.dsp.utils.settings")
    if settings_module is None or settings_module.settings.send_stream is None:
        return None
    try:
        from anyio.lowlevel import current_token

        return current_token()
    except Exception:  # no running event loop that AnyIO knows
        return None


@contextlib.contextmanager
def lending(token: Any) -> Iterator[None]:
    """Hold ``token`` as this thread's AnyIO token inside the block (if it has none of its own)."""
    if token is None:
        yield
        return
    locals_ = sys.modules["anyio._core._eventloop"].threadlocals
    previous = getattr(locals_, "current_token", _MISSING)
    if previous is not _MISSING:
        yield
        return
    locals_.current_token = token
    try:
        yield
    finally:
        del locals_.current_token


def listening() -> bool:
    """Whether a ``dspy.streamify`` call with stream listeners is running here."""
    settings_module = sys.modules.get("dspy.dsp.utils.settings")
    if settings_module is None:
        return False
    settings = settings_module.settings
    return settings.send_stream is not None and bool(settings.stream_listeners)
