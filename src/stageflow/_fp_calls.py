"""The fingerprint a cache keys one call with (internal): :func:`stageflow.fingerprint`, plus the
*current* plain data the stage reads from lists, dicts and sets.

:func:`stageflow.fingerprint` is remembered while a program's structure stays the same, and the
plain items of a mutable container are not part of that structure: a stage that appends to a log
keeps its fingerprint. But a function stage that reads ``RATES = {"eur": 2}`` from its module must
not be served its old outputs after ``RATES["eur"] = 5``. So when a stage's token left plain data out
(:attr:`Walker.elided <stageflow._fp_walker.Walker>`), its cache key is the hash of its complete
description as it is now — remembered per stage while that description is unchanged.

What tells a log from a setting is the stage itself: after a call that missed the cache, the data
is looked at again, and a container that changed while the stage ran (the innermost one that
changed, when they nest) is one the stage writes. Its plain data is left out of keys from then on
(:func:`~stageflow.fingerprinting.note_written`), and the output is stored under the key the next
call will compute. A container a stage both writes and reads is therefore keyed without its data,
as before. Calls of stages whose state is plain throughout (a ``dspy.Predict``, a pure function)
pay nothing for any of this.

Examples:
    >>> import stageflow
    >>> RATES = {"eur": 2}
    >>> calls = []
    >>> @stageflow.stage(writes=["y"])
    ... def convert(x):
    ...     calls.append(x)
    ...     return {"y": x * RATES["eur"]}
    >>> cached = stageflow.CachedStage(convert)
    >>> cached(x=3)["y"], cached(x=3)["y"], len(calls)  # the second call is a hit
    (6, 6, 1)
    >>> RATES["eur"] = 5
    >>> cached(x=3)["y"], len(calls)  # a changed setting is a miss, not a stale 6
    (15, 2)
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

from stageflow._fp_digest import weaken
from stageflow._fp_walker import Walker
from stageflow.fingerprinting import content_hash, note_written, structural, unwrap, written

__all__ = ["CallProbe", "call_fingerprint", "changed_since", "data_state"]

#: target -> (its last complete token, the hash of that description)
_DATA: weakref.WeakKeyDictionary[Any, tuple[Any, str]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()
#: ``id -> (a list, dict or set, its token, the id of the one enclosing it)``
Seen = dict[int, tuple[Any, Any, int | None]]


class CallProbe:
    """The data one call's key was computed from, to see after the call what the stage changed."""

    __slots__ = ("seen", "target")

    def __init__(self, target: Any, seen: Seen) -> None:
        self.target = target
        self.seen = seen

    def settle(self) -> str | None:
        """After the call ran: ``None`` when it changed none of the data it reads; otherwise those
        containers are remembered as the stage's own, and the fingerprint to store the output under
        (the one the next call will compute) is returned."""
        own = changed_since(self.seen, data_state(self.target))
        if not own:
            return None
        note_written(own)
        return call_fingerprint(self.target, unwrapped=True)[0]


def data_state(target: Any) -> Seen:
    """Every list, dict and set ``target`` holds or reads (but those stages write themselves):
    ``id -> (it, its token, the id of the one enclosing it)``."""
    walker = Walker(full=True, skip=written(), record=True)
    walker.token(target)
    return walker.seen or {}


def changed_since(before: Seen, after: Seen) -> dict[int, Any]:
    """The containers whose data changed from ``before`` to ``after`` (two :func:`data_state`): the
    innermost ones — a dict holding a list that changed changed through it."""
    changed = {
        key
        for key, (obj, token, _) in before.items()
        if key in after and after[key][0] is obj and after[key][1] != token
    }
    enclosing = set()
    for key in changed:
        outer = before[key][2]
        while outer is not None and outer not in enclosing:
            enclosing.add(outer)
            outer = before[outer][2] if outer in before else None
    return {key: before[key][0] for key in changed - enclosing}


def call_fingerprint(program: Any, *, unwrapped: bool = False) -> tuple[str, CallProbe | None]:
    """``(fingerprint, probe)`` for one cached call of ``program``.

    For a stage whose state is plain throughout this is ``(stageflow.fingerprint(program), None)``.
    For one that reads plain data from mutable containers it is the hash of its description with
    that data as it is now, and a :class:`CallProbe` to :meth:`~CallProbe.settle` after a miss.
    """
    target = program if unwrapped else unwrap(program)
    try:
        memo = _DATA.get(target)
    except TypeError:  # unhashable: hashed every time
        memo = None
    if memo is not None:  # it read data last time: its complete token alone tells whether anything changed
        walker = Walker(full=True, skip=written(), record=True)
        token = walker.token(target)
        if memo[0] == token:
            return memo[1], CallProbe(target, walker.seen or {})
    fp, elided = structural(target)
    if not elided:
        return fp, None
    walker = Walker(full=True, skip=written(), record=True)
    token = walker.token(target)
    data_fp = content_hash(target, written())
    if Walker(full=True, skip=written()).token(target) == token:  # unchanged while hashing
        try:
            with _LOCK:
                _DATA[target] = (weaken(token), data_fp)
        except TypeError:
            pass
    return data_fp, CallProbe(target, walker.seen or {})
