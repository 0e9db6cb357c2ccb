"""The pricing step of DSPy's async LM call, in line for the fast adapter's calls when it cannot
wait on anything.

DSPy 3.4.1's ``aexecute`` prices every answer on a worker thread
(``await asyncio.to_thread(_price_result, ...)``): the first pricing of a provider's answer may
load DSPy's model-metadata map, over the network with a five-second timeout, which must not run on
an event loop. After that first load the map is in memory (``model_metadata._data``) and pricing
is a look-up, and an answer of a custom engine (no provider) is never priced from it. The hop
then costs far more than the step: a worker thread woken, then the event loop woken from it, on
every LM call (BENCHMARKS.md: ~30 µs of CPU per branch in a fan-out of LM stages).

While :func:`install` is in effect, DSPy's execution module sees ``asyncio`` through
:class:`_Asyncio`: every name is asyncio's, looked up at each use, except ``to_thread``, which
runs ``_price_result`` in line (in a copy of the context, as ``to_thread`` runs it) when all of
these hold, and otherwise is asyncio's ``to_thread``, looked up at the call:

- the call is the fast adapter's (:data:`stageflow.lm.fast._request.sending` is set; an LM call
  your own LM makes inside it, a router's, counts as part of it);
- the step is DSPy's ``_price_result`` (by identity, as the execution module holds it now);
- its provider is ``None`` or the metadata map is loaded already.

The LM cache's steps (``_cached``, ``_store``: disk reads and writes) keep their threads, and DSPy's
sync call, which prices in line, is not changed. One difference remains by design: a cancellation
that arrives while an answer is priced reaches the call at its next wait instead of during the
pricing (the answer, its usage and its history are kept either way).

Example:
    >>> from stageflow.lm.fast import _pricing
    >>> _pricing.install()
    True
    >>> import asyncio, sys
    >>> sys.modules["dspy.clients.execution"].asyncio.sleep is asyncio.sleep
    True
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import threading
import types
from typing import Any

from stageflow.lm.fast._request import sending

__all__ = ["install", "installed", "uninstall"]

_execution: Any = importlib.import_module("dspy.clients.execution")
_metadata: Any = importlib.import_module("dspy.clients.model_metadata")
_LOCK = threading.Lock()


class _Asyncio(types.ModuleType):
    """``asyncio`` as DSPy's execution module sees it (see the module docstring)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def to_thread(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        if (
            func is _execution._price_result
            and not kwargs
            and len(args) == 5
            and (args[3] is None or _metadata._data is not None)
            and sending.get() is not None
        ):
            return contextvars.copy_context().run(func, *args)
        return await asyncio.to_thread(func, *args, **kwargs)


_PROXY = _Asyncio("asyncio")


def installed() -> bool:
    """Whether DSPy's execution module sees :class:`_Asyncio`."""
    return getattr(_execution, "asyncio", None) is _PROXY


def install() -> bool:
    """Let DSPy's execution module see :class:`_Asyncio`, if it sees asyncio itself now (a
    replacement of yours is left alone); whether it does now."""
    with _LOCK:
        found = getattr(_execution, "asyncio", None)
        if found is asyncio:
            _execution.asyncio = _PROXY
        return found is asyncio or found is _PROXY


def uninstall() -> None:
    """Give DSPy's execution module asyncio back."""
    with _LOCK:
        if installed():
            _execution.asyncio = asyncio
