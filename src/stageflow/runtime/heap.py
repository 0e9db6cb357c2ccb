"""Keep the heap that exists before a batch out of the garbage collector's full passes.

A batch runs the same pipeline thousands of times while the heap grows (DSPy keeps up to 10,000
LM history entries, plus whatever the program caches), so CPython's full collection runs during
the batch and walks every object of the process: DSPy, pydantic, the program, ~100,000+ objects.
Each full pass holds the GIL for 50-150 ms on a 2-core machine, stalling every record in flight.
:func:`frozen_heap` moves the objects that existed when the batch started to CPython's permanent
generation (:func:`gc.freeze`) for the length of the batch and back afterwards
(:func:`gc.unfreeze`), so full passes only walk what the batch itself created.

Nothing is lost: objects freed by reference counting are freed as always; a reference cycle that
was already garbage before the batch is collected by the first full pass after it. A process
that froze its heap itself (a pre-fork server, say) is left alone, and so is the collector's
on/off state and thresholds.

Example:
    >>> import gc
    >>> from stageflow.runtime.heap import frozen_heap
    >>> before = gc.get_freeze_count()
    >>> with frozen_heap():
    ...     gc.get_freeze_count() > 0 or before > 0
    True
    >>> gc.get_freeze_count() == before
    True
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["frozen_heap"]


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Freeze the current heap for the block (unless something froze it already)."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
