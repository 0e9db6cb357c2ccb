"""LM work in the worker threads of ``dspy.Parallel`` belongs to the stage that started them.

A stage (a custom module, say) that fans out with ``dspy.Parallel`` / ``Module.batch`` runs its LM
calls in DSPy's worker threads, where stageflow's context variables (the running pipeline's usage
table and stage path) are not set: Python does not copy context variables into a pool's threads.
DSPy copies its own settings overrides into them, in the thread that starts the work
(``ParallelExecutor.execute``). :func:`install` wraps that method once, so that inside a pipeline
call it first adds the running table, stage and path to those overrides; an LM call in a worker
thread then records its usage where the stage's own calls go (``stageflow.usage._where``), and the
profiler and per-stage usage count it; a pipeline called there runs under that path and reports its
usage to that stage (``stageflow.usage.calling_stage``). Inside a cached call it carries the cache's
watch for replaced failures too (``stageflow.stages.DEGRADED_KEY``), so a fallback in a worker thread
keeps the call's output out of the cache, as does an item DSPy gave up on (``None`` in its place).
Outside both the wrapper only calls DSPy's method.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from stageflow.engine.hooks import _PATH
from stageflow.stages import DEGRADED_KEY, degraded_watch
from stageflow.usage import _SETTINGS_KEY, _STAGE, _TABLE

__all__ = ["install"]

_INSTALLED = [False]
_LOCK = threading.Lock()


def install() -> None:
    """Wrap ``dspy.utils.parallelizer.ParallelExecutor.execute`` once (see the module docstring)."""
    if _INSTALLED[0]:
        return
    with _LOCK:
        if _INSTALLED[0]:
            return
        from dspy.utils.parallelizer import ParallelExecutor

        original = ParallelExecutor.execute
        overrides_var = sys.modules["dspy.dsp.utils.settings"].thread_local_overrides

        def execute(self: Any, function: Any, data: Any) -> Any:
            table = _TABLE.get()
            watch = degraded_watch()
            if table is None and watch is None:  # not inside a pipeline call or a cached call
                return original(self, function, data)
            current = overrides_var.get()
            here = type(current)(current)
            if table is not None:
                here[_SETTINGS_KEY] = (table, _STAGE.get(), _PATH.get())
            if watch is not None:
                here[DEGRADED_KEY] = watch
            token = overrides_var.set(here)
            before = len(getattr(self, "failed_indices", ()))
            try:
                out = original(self, function, data)
            finally:
                overrides_var.reset(token)
            if watch is not None and len(getattr(self, "failed_indices", ())) > before:
                # DSPy went on past failed items (None in their place): not the answer to cache
                watch.append(True)
            return out

        execute.__wrapped__ = original  # type: ignore[attr-defined]
        execute.__doc__ = original.__doc__
        ParallelExecutor.execute = execute
        _INSTALLED[0] = True
