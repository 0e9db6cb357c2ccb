"""Code digests for :func:`stageflow.fingerprint` (internal): what a code object does, and which
attributes a library class assigns.

Both are remembered per code object / class (weakly), so each is computed once.
"""

from __future__ import annotations

import dis
import hashlib
import types
import weakref
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["assigned_attributes", "code_digest", "codes_of"]

_CODE_DIGESTS: weakref.WeakKeyDictionary[types.CodeType, str] = weakref.WeakKeyDictionary()
_ASSIGNED: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()


def _const(c: Any) -> Any:
    t = type(c)
    if t is types.CodeType:
        return ("code", code_digest(c))
    if t is float:
        return ("f", c.hex())
    if t is bool:
        return ("b", int(c))
    if t is tuple or t is frozenset:
        items = [_const(x) for x in c]
        return (t.__name__, *(sorted(items, key=repr) if t is frozenset else items))
    return (t.__name__, repr(c))


def code_digest(code: types.CodeType) -> str:
    """A stable hash of what a code object does: bytecode, constants (nested code included), names,
    argument layout and flags — not its file name or line numbers.

    >>> code_digest((lambda x: x * 2).__code__) == code_digest((lambda x: x * 3).__code__)
    False
    """
    digest = _CODE_DIGESTS.get(code)
    if digest is None:
        parts = (
            code.co_name,
            code.co_argcount,
            code.co_posonlyargcount,
            code.co_kwonlyargcount,
            code.co_flags,
            code.co_code,
            code.co_names,
            code.co_varnames,
            code.co_freevars,
            code.co_cellvars,
            getattr(code, "co_exceptiontable", b""),
            tuple(_const(c) for c in code.co_consts),
        )
        digest = hashlib.sha256(repr(parts).encode("utf-8", "surrogatepass")).hexdigest()
        _CODE_DIGESTS[code] = digest
    return digest


def codes_of(value: Any) -> Iterator[types.CodeType]:
    """The code objects of a class attribute (a function, classmethod, staticmethod or property),
    nested functions included."""
    fns = [getattr(value, "__func__", value)]
    if isinstance(value, property):
        fns = [value.fget, value.fset, value.fdel]
    for fn in fns:
        code = getattr(fn, "__code__", None)
        if type(code) is not types.CodeType:
            continue
        stack = [code]
        while stack:
            c = stack.pop()
            yield c
            stack.extend(x for x in c.co_consts if type(x) is types.CodeType)


def assigned_attributes(cls: type, is_library: Callable[[type], bool]) -> frozenset[str]:
    """The attribute names that the *library* classes among ``cls``'s bases assign in their code
    (``self.calls = 0``, ``self.demos = []``): the run state and settings they manage themselves.

    An attribute of an instance of ``cls`` whose name is not in this set was set by your own code
    (your subclass's ``__init__``, or after construction), so it is part of the fingerprint.

    >>> class Base:
    ...     def __init__(self):
    ...         self.calls = 0
    >>> sorted(assigned_attributes(Base, lambda c: True))
    ['calls']
    """
    known = _ASSIGNED.get(cls)
    if known is None:
        names: set[str] = set()
        for klass in cls.__mro__:
            if klass is object or not is_library(klass):
                continue
            for value in vars(klass).values():
                for code in codes_of(value):
                    names.update(i.argval for i in dis.get_instructions(code) if i.opname == "STORE_ATTR")
        known = frozenset(names)
        _ASSIGNED[cls] = known
    return known
