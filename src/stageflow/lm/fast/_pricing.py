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
- the step is DSPy's own ``_price_result``, and what it runs through (``estimate_cost``,
  ``model_info``, the metadata loader, the route resolver) is DSPy's too: a price hook of yours
  put in their place gets its thread (:func:`prices_in_line`);
- its provider is ``None`` or the metadata map is loaded already.

The call still gives the event loop a turn where the hop was (``asyncio.sleep(0)``): with the LM
cache off and an engine that answers without waiting, the hop was the call's only wait, and
without one a timeout, a cancellation or another task would never get in.

The LM cache's steps (``_cached``, ``_store``: disk reads and writes) keep their threads, and DSPy's
sync call, which prices in line, is not changed. A patch of ``asyncio.to_thread`` of yours still
sees every step that goes to a thread, but not the pricing of these calls. A cancellation lands
where it did, at the wait after pricing, but once the pricing is done rather than while a worker
thread runs it.

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
from stageflow.lm.fast._watch import recheck

__all__ = ["install", "installed", "prices_in_line", "uninstall"]

_execution: Any = importlib.import_module("dspy.clients.execution")
_metadata: Any = importlib.import_module("dspy.clients.model_metadata")
_costs: Any = importlib.import_module("dspy.clients.costs")
_capabilities: Any = importlib.import_module("dspy.clients.capabilities")
_LOCK = threading.Lock()

_METADATA = "dspy/clients/model_metadata/__init__.py"

#: What the pricing step runs through, watched as :mod:`._watch` describes: one of them replaced
#: (a price hook of yours, which may wait on anything) sends the step to a worker thread again.
_WATCHED: tuple[tuple[Any, str, Any], ...] = (
    (_execution, "_price_result", (("_price_result", "dspy/clients/execution.py"),)),
    (_costs, "estimate_cost", (("estimate_cost", "dspy/clients/costs.py"),)),
    (_costs, "_estimate_cost", (("_estimate_cost", "dspy/clients/costs.py"),)),
    (_costs, "model_info", (("model_info", _METADATA),)),
    (_metadata, "_load", (("_load", _METADATA),)),
    (_capabilities, "resolve", (("resolve", "dspy/clients/capabilities.py"),)),
)
_SEEN: list[tuple[Any, ...] | None] = [None]


def _untouched() -> bool:
    seen = _SEEN[0]
    if (
        seen is not None
        and _execution._price_result is seen[0]
        and _costs.estimate_cost is seen[1]
        and _costs._estimate_cost is seen[2]
        and _costs.model_info is seen[3]
        and _metadata._load is seen[4]
        and _capabilities.resolve is seen[5]
    ):
        return True
    return recheck(_SEEN, tuple(getattr(o, name, None) for o, name, _ in _WATCHED), _WATCHED)


def prices_in_line(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``func(*args, **kwargs)``, a step DSPy sends to a worker thread, is DSPy's own
    pricing step and cannot wait on anything: the answer of a custom engine (no provider), or the
    metadata map loaded already, and nothing it runs through replaced.

    >>> prices_in_line(len, ([],), {})
    False
    """
    return (
        func is _execution._price_result
        and not kwargs
        and len(args) == 5
        and (args[3] is None or _metadata._data is not None)
        and _untouched()
    )


class _Asyncio(types.ModuleType):
    """``asyncio`` as DSPy's execution module sees it (see the module docstring)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    @staticmethod
    async def to_thread(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        if sending.get() is not None and prices_in_line(func, args, kwargs):
            value = contextvars.copy_context().run(func, *args)
            # (the call still gives the loop a turn here, as the hop did: an engine that answers
            # without waiting, the LM cache off, would otherwise never let a timeout, a
            # cancellation or another task in)
            await asyncio.sleep(0)
            return value
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
