"""The garbage collector during a batch: the heap from before it frozen, young collections rarer.

A batch runs the same pipeline thousands of times while the heap grows (DSPy keeps up to 10,000
LM history entries, plus whatever the program caches), so CPython's full collection runs during
the batch and walks every object of the process: DSPy, pydantic, the program, ~100,000+ objects.
Each full pass holds the GIL for 50-150 ms on a 2-core machine, stalling every record in flight.
:func:`batch_heap` moves the objects that existed when the batch started to CPython's permanent
generation (:func:`gc.freeze`) for the length of the batch and back afterwards
(:func:`gc.unfreeze`), so full passes only walk what the batch itself created.

It also raises the youngest generation's threshold from CPython's 700 to
:data:`YOUNG_THRESHOLD` (CPython 3.13 raised its own default to 2,000): with 32 records in flight
each young collection walks all their live objects, and at 700 they ran every few stage calls
(~34 µs of CPU per stage call in ``benchmarks/batch.py``, ~10 µs at 5,000; paired runs, one
process). Garbage in reference cycles waits a little longer for its collection; nothing else
changes.

Nothing is lost: objects freed by reference counting are freed as always; a reference cycle that
was already garbage before the batch is collected by the first full pass after it. A process
that froze its heap itself (a pre-fork server, say) is left alone; so is a threshold already at
or above ours, or 0 (automatic collection off); thresholds are restored afterwards unless
something changed them meanwhile.

Example:
    >>> import gc
    >>> from stageflow.runtime.heap import YOUNG_THRESHOLD, batch_heap
    >>> before = gc.get_threshold()
    >>> with batch_heap():
    ...     gc.get_freeze_count() > 0, gc.get_threshold()[0] >= min(before[0], YOUNG_THRESHOLD)
    (True, True)
    >>> gc.get_threshold() == before
    True
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["YOUNG_THRESHOLD", "batch_heap"]

#: The youngest generation's collection threshold while a batch runs.
YOUNG_THRESHOLD = 5000


@contextmanager
def batch_heap() -> Iterator[None]:
    """Freeze the current heap and raise the young threshold for the block (see the module)."""
    freeze = not gc.get_freeze_count()
    before = gc.get_threshold()
    raise_young = 0 < before[0] < YOUNG_THRESHOLD
    if freeze:
        gc.freeze()
    if raise_young:
        gc.set_threshold(YOUNG_THRESHOLD, *before[1:])
    try:
        yield
    finally:
        if raise_young and gc.get_threshold()[0] == YOUNG_THRESHOLD:
            gc.set_threshold(*before)
        if freeze:
            gc.unfreeze()
