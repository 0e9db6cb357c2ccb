"""Which branches a sync fan-out runs as tasks on stageflow's background event loop, not on threads.

A thread per waiting branch costs CPU in wake-ups and GIL hand-offs while the branch only waits
(measured in ``benchmarks/lm_fanout.py``: a sync ``ForEach`` of 128 ``Predict`` stages spent ~50 µs
more CPU per branch than the same fan-out awaited). So a sync fan-out whose every branch can be
awaited natively runs as the async fan-out does, on the background loop, and the caller waits
for it:

- an ``async def`` function stage;
- a ``dspy.Predict`` / ``dspy.ChainOfThought`` stage whose LM is a plain ``dspy.LM`` with an async
  path of its own: a provider model (``dspy.LM("openai/...")``: DSPy awaits its HTTP client) or a
  custom engine given with ``async_engine=``. An LM of another class (a subclass, ``DummyLM``, a
  ``BaseLM`` of yours) may only work, or only be fast, called synchronously: its branches stay on
  threads. So do the branches of a call with DSPy callbacks in force (on the settings, the LM,
  the module or the configured adapter): a callback is your code, and may block or run stageflow
  in turn, which must not
  happen on the one event loop every such fan-out in the process shares.

The branches then run the engine's async path, which is the sync path's twin (the same policies,
events, usage and results). A Ctrl-C in the caller cancels them. An async engine must not block
(``time.sleep`` in an ``async def``): on the shared loop it would hold up every such fan-out.

Example:
    >>> import dspy
    >>> from stageflow.engine.awaitable import lm_awaits
    >>> lm_awaits(dspy.LM("openai/gpt-4o-mini"))
    True
    >>> from dspy.utils import DummyLM
    >>> lm_awaits(DummyLM([{"answer": "4"}]))
    False
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import dspy

from stageflow.engine.plan import FUNCTION, StageEntry, leaf_of

__all__ = ["awaits_natively", "lm_awaits"]


def lm_awaits(lm: Any) -> bool:
    """Whether ``lm`` is a ``dspy.LM`` whose async call awaits its own engine (see the module
    docstring)."""
    if type(lm) is not dspy.LM:
        return False
    spec = getattr(lm, "_engine_spec", None)
    return isinstance(spec, str) or getattr(lm, "_async_engine_spec", None) is not None


def _predictor_awaits(module: Any) -> bool:
    predictor = module if type(module) is dspy.Predict else getattr(module, "predict", None)
    lm = getattr(predictor, "lm", None)
    if lm is None:
        lm = dspy.settings.lm
    holders = (module, predictor, lm, dspy.settings.adapter)
    if dspy.settings.callbacks or any(getattr(o, "callbacks", None) for o in holders):
        return False  # (callbacks are your code: they run where the call runs, on threads)
    return lm_awaits(lm)


def awaits_natively(owner: Any, entries: Sequence[StageEntry]) -> bool:
    """Whether every one of ``entries`` (stages of ``owner``) can be awaited natively."""
    if not entries:
        return False
    seen: set[int] = set()  # (entries, and the predictors they hold: a ForEach's items share one)
    for entry in entries:
        if id(entry) in seen:
            continue
        seen.add(id(entry))
        if entry.kind == FUNCTION:
            if not entry.is_async_fn:
                return False
            continue
        if not entry.predictor:
            return False
        module = leaf_of(owner, entry)
        if id(module) in seen:
            continue
        if not _predictor_awaits(module):
            return False
        seen.add(id(module))
    return True
