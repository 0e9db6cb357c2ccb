"""The default executor of stageflow's background event loop: DSPy's short LM-call steps run in line.

DSPy 3.4.1's async LM call (``dspy.clients.execution.aexecute``) sends three short steps to a worker
thread with ``asyncio.to_thread``, each once per call: the LM cache lookup (``_cached``) and write
(``_store``) when the cache is on (DSPy's default), and the advisory pricing (``_price_result``:
the call's cost from pricing tables already loaded after the first call). Each hop — a worker
thread woken, then the event loop woken from it — costs more CPU than the step itself, and in a
fan-out of LM stages the GIL is what the branches wait for (BENCHMARKS.md: a sync ``ForEach`` of
128 ``Predict`` stages spent ~40 µs per branch on the pricing hop, and with the cache on ~400 µs on
the three). DSPy's sync call runs the same three steps in line, on the calling thread.

On the loop stageflow owns (where a sync fan-out runs its LM stages), the loop's default executor
runs those steps in line instead (pricing only when it cannot wait on anything: not the first
pricing of a provider's answer, which may fetch DSPy's model metadata over the network, nor a
pricing function of yours; see :func:`stageflow.lm.fast._pricing.prices_in_line`): same
functions, same arguments, same context copy, so results, cache entries and cost figures are the
same; a cache write runs to its end before a cancellation can reach the call (never a partial
entry, as DSPy requires). Every other call goes to the
executor's threads as before. The user's own event loops are never changed. A slow disk under
DSPy's disk cache then holds up the loop for that read or write (as it holds up a sync call's
thread).

Everything that runs on stageflow's loop runs there for a sync call of yours (a sync fan-out, or a
sync call of an ``async def`` stage; awaited calls run on your loop). So the cache steps look up and
write the entries DSPy's *sync* call keys (DSPy keys its LM cache apart for sync and async calls):
a sync pipeline call shares its LM cache entries with a plain ``predict(...)`` and with the same
fan-out run on threads, whichever way stageflow routes it. An awaited ``acall`` keys async entries,
as DSPy's ``Predict.acall`` does.

The steps are recognised by identity (``asyncio.to_thread`` submits ``partial(context.run, func,
*args)``), as DSPy's execution module holds them when the call is made: a DSPy without them, or that
calls them otherwise, simply gets the threads.
"""

from __future__ import annotations

import concurrent.futures
import functools
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["LoopExecutor", "in_line_steps"]


def in_line_steps() -> tuple[Any, ...]:
    """The functions :class:`LoopExecutor` runs in line, as DSPy's execution module holds them now
    (none while that module is not imported)."""
    execution = sys.modules.get("dspy.clients.execution")
    if execution is None:
        return ()
    return tuple(f for f in (getattr(execution, n, None) for n in _STEPS) if f is not None)


_STEPS = ("_price_result", "_cached", "_store")


def _step_name(f: Any) -> str | None:
    """The name of the step of :func:`in_line_steps` that ``f`` is, by identity (never ``==``: what a
    partial of yours holds first may compare in any way, or refuse to), or ``None``."""
    execution = sys.modules.get("dspy.clients.execution")
    if execution is None:
        return None
    for name in _STEPS:
        if f is getattr(execution, name, None):
            return name
    return None


class LoopExecutor(concurrent.futures.ThreadPoolExecutor):
    """A ``ThreadPoolExecutor`` that runs the steps of :func:`in_line_steps` in the submitting
    thread (the event loop's) and everything else on its threads.

    >>> import functools
    >>> ex = LoopExecutor(max_workers=1)
    >>> ex.submit(functools.partial(pow, 2), 5).result()  # (not a step: on a worker thread)
    32
    >>> ex.shutdown()
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        name = _step_name(fn.args[0]) if type(fn) is functools.partial and fn.args else None
        if name == "_price_result" and isinstance(fn, functools.partial) and not _prices_in_line(fn):
            name = None  # (the first pricing of a provider may fetch DSPy's metadata: a thread's)
        if name is not None and isinstance(fn, functools.partial):
            done: concurrent.futures.Future[Any] = concurrent.futures.Future()
            try:
                done.set_result(_as_sync(fn, name)(*args, **kwargs))
            except BaseException as e:  # (delivered to the awaiting task, as from a thread)
                done.set_exception(e)
            return done
        return super().submit(fn, *args, **kwargs)


def _prices_in_line(fn: functools.partial[Any]) -> bool:
    """Whether the pricing step ``fn`` (``partial(context.run, _price_result, *args)``) cannot wait on
    anything (:func:`stageflow.lm.fast._pricing.prices_in_line`): not the first pricing of a
    provider's answer, which may fetch DSPy's model metadata over the network (helper 111)."""
    from stageflow.lm.fast._pricing import prices_in_line

    return prices_in_line(fn.args[0], fn.args[1:], fn.keywords)


#: How many positional arguments (the step included) ``asyncio.to_thread`` passes for the cache
#: steps, whose last one is DSPy's ``asynchronous`` flag: ``_cached(lm, call, asynchronous)``,
#: ``_store(lm, call, result, asynchronous)``.
_CACHE_STEPS = {"_cached": 4, "_store": 5}


def _as_sync(fn: functools.partial[Any], name: str) -> functools.partial[Any]:
    """``fn`` (the step ``name``) with a cache step's ``asynchronous=True`` turned to ``False`` (see
    the module docstring: the sync call's cache entries); any other step, or a call shaped
    otherwise, as it is."""
    args = fn.args
    if len(args) == _CACHE_STEPS.get(name) and args[-1] is True and not fn.keywords:
        return functools.partial(fn.func, *args[:-1], False)
    return fn
