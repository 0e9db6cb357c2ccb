"""The default executor of stageflow's background event loop: DSPy's pricing step runs in line.

DSPy 3.4.1's async LM call (``dspy.clients.execution.aexecute``) sends its advisory pricing step
(``_price_result``: the call's cost from the pricing tables, already loaded after the first call)
to a worker thread with ``asyncio.to_thread`` once per call. That hop — a worker thread woken, then
the event loop woken from it — costs more CPU than the rest of an async ``Predict`` call on the
stage path (BENCHMARKS.md, "CPU per async call"), and in a fan-out of LM stages the GIL is what
the branches wait for. On the loop stageflow owns (where a sync fan-out runs its LM stages), the
loop's default executor runs that one step in line instead: same function, same arguments, same
context copy, so the result (``cost``, ``cost_details``) is the same; every other call goes to the
executor's threads as before. The user's own event loops are never changed.

The step is recognised by identity (``asyncio.to_thread`` submits ``partial(context.run, func,
*args)``): a DSPy without that function, or that calls it otherwise, simply gets the thread.
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
    (none while that module is not imported, or has none of them)."""
    price = getattr(sys.modules.get("dspy.clients.execution"), "_price_result", None)
    return () if price is None else (price,)


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
        if type(fn) is functools.partial and fn.args and fn.args[0] in in_line_steps():
            done: concurrent.futures.Future[Any] = concurrent.futures.Future()
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as e:  # (delivered to the awaiting task, as from a thread)
                done.set_exception(e)
            return done
        return super().submit(fn, *args, **kwargs)
