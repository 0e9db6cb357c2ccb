"""The fingerprint a cache keys one call with (internal): :func:`stageflow.fingerprint`, plus the
*current* plain data the stage reads from lists, dicts and sets.

:func:`stageflow.fingerprint` is remembered while a program's structure stays the same, and the
plain items of a mutable container are not part of that structure. But a function stage that reads
``RATES = {"eur": 2}`` from its module must not be served its old outputs after ``RATES["eur"] = 5``.
So when a stage's token left plain data out (:attr:`Walker.elided <stageflow._fp_walker.Walker>`),
its cache key is the hash of its complete description as it is now, data included — remembered
per stage while that description is unchanged.

A stage may also keep state of its own: ``calls.append(x)`` or ``stats["n"] += 1`` on every call.
Keyed with that data, such a stage would never hit. So after a call that missed the cache the data
is looked at again (:meth:`CallProbe.settle`):

- nothing the key covers changed: the output is stored under the key;
- some lists, dicts or sets changed, and nothing else did: those (the innermost ones, when they
  nest) are the stage's own — left out of *that stage's* keys from then on, and the output stored
  under the key its next call will compute. A container that only *grew* (items appended, keys
  added with the others' values kept: a log) is the stage's own at once; one whose values changed
  (a counter) once a second call changes it too. Changed once, it may as well be a setting another
  thread edited meanwhile: the output is not stored;
- anything else changed during the call (an attribute, an array): the output is not stored, since
  no key is sure to describe what it was computed from.

A container stays the stage's own while only the stage changes it: if it changed between two calls
(the user cleared the log, or edited a table the stage had filled), it is part of the key again,
until calls are seen changing it once more. Another stage's keys are not affected: a dict one stage
counts in is still part of the key of a stage that reads it. Calls of stages whose state is plain
throughout (a ``dspy.Predict``, a pure function) pay nothing for any of this.

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

import contextlib
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from stageflow._fp_digest import Bag, weaken
from stageflow._fp_walker import Walker
from stageflow.fingerprinting import content_hash, structural, unwrap

__all__ = ["CallProbe", "Seen", "call_fingerprint", "changed_since", "data_state", "token_of"]

#: ``id -> (a list, dict or set, its token, the id of the one enclosing it)``
Seen = dict[int, tuple[Any, Any, int | None]]
#: ``id -> (a container a stage appends to, its token when last seen)``
Own = dict[int, tuple[Any, Any]]

#: target -> (its last complete token, the hash of that description)
_DATA: weakref.WeakKeyDictionary[Any, tuple[Any, str]] = weakref.WeakKeyDictionary()
#: target -> the containers its own calls append to or count in (left out of its keys)
_OWN: weakref.WeakKeyDictionary[Any, Own] = weakref.WeakKeyDictionary()
#: target -> ids of containers whose values one of its calls changed (a second time makes them its own)
_ONCE: weakref.WeakKeyDictionary[Any, set[int]] = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


class CallProbe:
    """The data one call's key was computed from, to see after the call what the stage changed."""

    __slots__ = ("fp", "own", "seen", "target", "token")

    def __init__(self, target: Any, fp: str, token: Any, seen: Seen, own: Own) -> None:
        self.target, self.fp, self.token, self.seen, self.own = target, fp, token, seen, own

    def settle(self) -> str | None:
        """After the call ran: the fingerprint to store its output under, or ``None`` when it must
        not be stored (see the module docstring)."""
        after = Walker(full=True, skip=self.own, record=True)
        token = after.token(self.target)
        now = after.seen or {}
        own = {k: (obj, token_of(obj)) for k, (obj, _) in self.own.items()}  # (grown meanwhile)
        if token == self.token:
            _set_own(self.target, own)
            return self.fp
        changed = changed_since(self.seen, now)
        if not changed or _mask(self.token, {id(self.seen[k][1]) for k in changed}) != _mask(
            token, {id(now[k][1]) for k in changed}
        ):
            _set_own(self.target, own)
            return None  # (something besides lists, dicts and sets changed)
        # A container that grew is a log; one whose values changed is the stage's own once a second
        # call changes it too (a counter) — once may be another thread editing a setting meanwhile.
        seen_once = _ONCE.get(self.target) or set()
        unconfirmed = {k for k in changed if k not in seen_once and not _grew(self.seen[k][1], now[k][1])}
        if unconfirmed:
            with contextlib.suppress(TypeError), _LOCK:
                _ONCE[self.target] = seen_once | unconfirmed
            _set_own(self.target, own)
            return None
        own.update({k: (now[k][0], now[k][1]) for k in changed})
        _set_own(self.target, own)
        return call_fingerprint(self.target, unwrapped=True)[0]


def call_fingerprint(program: Any, *, unwrapped: bool = False) -> tuple[str, CallProbe | None]:
    """``(fingerprint, probe)`` for one cached call of ``program``.

    For a stage whose state is plain throughout this is ``(stageflow.fingerprint(program), None)``.
    For one that reads plain data from mutable containers it is the hash of its description with
    that data as it is now (but its own logs), and a :class:`CallProbe` to
    :meth:`~CallProbe.settle` after a miss.
    """
    target = program if unwrapped else unwrap(program)
    own = _current_own(target)
    try:
        memo = _DATA.get(target)
    except TypeError:  # unhashable: hashed every time
        memo = None
    if memo is not None:  # it read data last time: its complete token alone tells whether anything changed
        walker = Walker(full=True, skip=own, record=True)
        token = walker.token(target)
        if memo[0] == token:
            return memo[1], CallProbe(target, memo[1], token, walker.seen or {}, own)
    fp, elided = structural(target)
    if not elided:
        return fp, None
    walker = Walker(full=True, skip=own, record=True)
    token = walker.token(target)
    data_fp = content_hash(target, own)
    if Walker(full=True, skip=own).token(target) == token:  # unchanged while hashing
        try:
            with _LOCK:
                _DATA[target] = (weaken(token), data_fp)
        except TypeError:
            pass
    return data_fp, CallProbe(target, data_fp, token, walker.seen or {}, own)


def data_state(target: Any, skip: Mapping[int, Any] | None = None) -> Seen:
    """Every list, dict and set ``target`` holds or reads (but those in ``skip``)."""
    walker = Walker(full=True, skip=skip, record=True)
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


def _current_own(target: Any) -> Own:
    """The containers ``target``'s calls append to, but those changed since its last call (changed
    from outside: part of its key again)."""
    try:
        own = _OWN.get(target)
    except TypeError:
        return {}
    if not own:
        return {}
    kept = {k: (obj, token) for k, (obj, token) in own.items() if token_of(obj) == token}
    if len(kept) != len(own):
        _set_own(target, kept)
    return kept


def _set_own(target: Any, own: Own) -> None:
    try:
        with _LOCK:
            if own:
                _OWN[target] = own
            else:
                _OWN.pop(target, None)
    except TypeError:
        pass  # (not weak-referenceable: no log is ever left out)


def token_of(container: Any) -> Any:
    """A container's complete token (its data as it is now)."""
    return Walker(full=True).tok(container, 0)


def _grew(before: Any, after: Any) -> bool:
    """Whether a container's token only grew: items appended to a list, keys added to a dict with
    the others' values kept (both in order), items added to a set."""
    if type(before) is not tuple or type(after) is not tuple or not before or not after:
        return False
    if before[0] != after[0] or before[0] not in ("list", "dict", "set", "data"):
        return False
    if before[0] == "set":
        old, new = before[1], after[1]
        return type(old) is Bag and type(new) is Bag and all(x in new for x in old)
    return len(after) >= len(before) and after[: len(before)] == before


def _mask(token: Any, ids: set[int]) -> Any:
    """``token`` with the parts whose ``id`` is in ``ids`` replaced by one marker."""
    if id(token) in ids:
        return ("masked",)
    t = type(token)
    if t is tuple:
        return tuple([_mask(x, ids) for x in token])
    if t is Bag:
        return Bag([_mask(x, ids) for x in token])
    return token
