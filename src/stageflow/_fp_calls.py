"""The fingerprint a cache keys one call with (internal): :func:`stageflow.fingerprint`, plus the
*current* plain data the stage reads from lists, dicts and sets.

:func:`stageflow.fingerprint` is remembered while a program's structure stays the same, and the
plain items of a mutable container are not part of that structure. But a function stage that reads
``RATES = {"eur": 2}`` from its module must not be served its old outputs after ``RATES["eur"] = 5``.
So when a stage's token left plain data out (:attr:`Walker.elided <stageflow._fp_walker.Walker>`),
its cache key is the hash of its complete description as it is now, data included — remembered
per stage while that description is unchanged.

The output of a call that missed is stored under that key only if nothing the key covers changed
while the call ran (:meth:`CallProbe.changed`): a stage that appends to a list it can reach (a call
log), counts in a dict, or changes an attribute of its own would otherwise be filed under a key
describing data it was not computed from — or, read by another thread meanwhile, a setting edited
in the middle of the call. Such a stage is not cached, and the cache warns once, naming it and what
changed; data that does not change a stage's outputs is created with :func:`stageflow.untracked`
and left out (so the stage hits again). Calls of stages whose state is plain throughout (a
``dspy.Predict``, a pure function) pay nothing for any of this.

Examples:
    >>> import stageflow
    >>> RATES = {"eur": 2}
    >>> calls = stageflow.untracked([])  # the stage's own log: not part of its keys
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

from stageflow._fp_digest import recording_views, same, views_hold, weaken
from stageflow._fp_walker import Walker
from stageflow.fingerprinting import content_hash, structural, unwrap

__all__ = ["CallProbe", "Seen", "call_fingerprint", "changed_since", "data_state", "described"]

#: ``id -> (a list, dict or set, its token, the id of the one enclosing it)``
Seen = dict[int, tuple[Any, Any, int | None]]

#: target -> (its last complete token, the hash of that description)
_DATA: weakref.WeakKeyDictionary[Any, tuple[Any, str]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class CallProbe:
    """The data one call's key was computed from, to see after the call whether it changed."""

    __slots__ = ("seen", "target", "token")

    def __init__(self, target: Any, token: Any, seen: Seen) -> None:
        self.target, self.token, self.seen = target, token, seen

    def changed(self) -> str | None:
        """After the call ran: ``None`` when the data the key covers is as it was (the output may be
        stored under the key), else what changed (it must not be)."""
        after = Walker(full=True, record=True)
        if same(after.token(self.target), self.token):
            return None
        changed = changed_since(self.seen, after.seen or {})
        if not changed:
            return "its own state (an attribute, or an array) changed while it ran"
        kinds = sorted({described(obj, self.target) for obj in changed.values()})
        return f"{', '.join(kinds)} it can reach changed while it ran"


def call_fingerprint(program: Any, *, unwrapped: bool = False) -> tuple[str, CallProbe | None]:
    """``(fingerprint, probe)`` for one cached call of ``program``.

    For a stage whose state is plain throughout this is ``(stageflow.fingerprint(program), None)``.
    For one that reads plain data from mutable containers it is the hash of its description with
    that data as it is now, and a :class:`CallProbe` to ask, after a miss, whether it changed.
    """
    target = program if unwrapped else unwrap(program)
    try:
        memo = _DATA.get(target)
    except TypeError:  # unhashable: hashed every time
        memo = None
    walker: Walker | None = None
    seen: list[tuple[Any, Any]] = []
    if memo is not None:  # it read data last time: its complete token alone tells whether anything changed
        walker = Walker(full=True, record=True)
        with recording_views() as seen:
            token = walker.token(target)
        if same(memo[0], token):
            return memo[1], CallProbe(target, token, walker.seen or {})
    fp, elided = structural(target)
    if not elided:
        return fp, None
    if walker is None:  # (else the walk above is still the current one)
        walker = Walker(full=True, record=True)
        with recording_views() as seen:
            token = walker.token(target)
    with recording_views() as used:
        data_fp = content_hash(target)
    # (unchanged while hashing, and the signatures described as the token saw them)
    if same(Walker(full=True).token(target), token) and views_hold(seen, used):
        try:
            with _LOCK:
                _DATA[target] = (weaken(token), data_fp)
        except TypeError:
            pass
    return data_fp, CallProbe(target, token, walker.seen or {})


def data_state(target: Any) -> Seen:
    """Every list, dict and set ``target`` holds or reads."""
    walker = Walker(full=True, record=True)
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


def described(container: Any, holder: Any = None) -> str:
    """``the list 'calls' (3 items)``, or ``a list of 3 items`` when ``holder`` (a function, a function
    stage or an object) does not name it directly (for a warning)."""
    n = len(container)
    kind = type(container).__name__
    name = _name_in(container, holder)
    if name is None:
        return f"a {kind} of {n} item{'s' if n != 1 else ''}"
    return f"the {kind} {name!r} ({n} item{'s' if n != 1 else ''})"


def _name_in(container: Any, holder: Any) -> str | None:
    """The name ``holder`` reaches ``container`` by: a global or closure variable of a function, an
    attribute of an object (``self.calls``), one level deep."""
    fn = getattr(holder, "fn", holder)  # (a function stage: its function)
    fn = getattr(fn, "__func__", fn)
    spaces: list[tuple[str, dict[str, Any]]] = []
    code = getattr(fn, "__code__", None)
    if code is not None:
        cells = getattr(fn, "__closure__", None) or ()
        free: dict[str, Any] = {}
        for var, cell in zip(code.co_freevars, cells, strict=False):
            try:
                free[var] = cell.cell_contents
            except ValueError:
                continue
        spaces += [("", free), ("", {k: v for k, v in fn.__globals__.items() if k in code.co_names})]
    state = getattr(fn, "__dict__", None)
    if isinstance(state, dict) and code is None:
        spaces.append(("self.", state))
    for prefix, space in spaces:
        for key, value in space.items():
            if value is container:
                return prefix + key
    return None
