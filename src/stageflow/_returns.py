"""Whether ``None`` returned by a function stage with one declared output can be meant.

A function stage declared with a single output (``@stage(writes=["answer"])``) may return that
output's value on its own. A function that forgot its ``return`` then returns ``None``, and without
a check that ``None`` would be written as the answer: a silent wrong result. :func:`none_is_wrong`
says when such a ``None`` cannot be meant: the code that runs has no ``return <value>`` anywhere in
its body (only a bare ``return``, ``return None`` or the end of the body), so ``None`` is all it can
return — unless its return annotation says ``None`` is a value it gives (``-> str | None``,
``Optional[str]``, ``Any``; not ``-> None``). A lambda is one expression: its ``None`` is meant.

The code read is the code that runs: a decorator's wrapper (``functools.wraps`` or not) is read
itself, not the function it wraps, since what the wrapper returns is what the stage returns; a
wrapper without Python code (``functools.lru_cache``) is read through. A function that returns a
value on some path may return ``None`` on another: that ``None`` is written, as returned.
Returning ``{"answer": None}`` always writes ``None`` on purpose.

>>> def forgot(question: str):
...     question.upper()
>>> none_is_wrong(forgot)
'it has no `return <value>` statement'
>>> def stub(question: str) -> str | None:
...     pass
>>> none_is_wrong(stub) is None
True
>>> def maybe(question: str):
...     return question.upper() if question else None
>>> none_is_wrong(maybe) is None
True
"""

from __future__ import annotations

import contextlib
import dis
import functools
import inspect
import types
import typing
import weakref
from collections.abc import Callable
from typing import Any

__all__ = ["none_is_wrong"]

_SEEN: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()
_NO_VALUE = inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR


def none_is_wrong(fn: Callable[..., Any]) -> str | None:
    """Why ``None`` returned by ``fn`` cannot be meant as its single output (a phrase for an error
    message), or ``None`` when it may be meant or it cannot be told (no code to read: a builtin)."""
    try:
        return _SEEN[fn]
    except (KeyError, TypeError):
        pass
    reason = _reason(fn)
    with contextlib.suppress(TypeError):  # (not weakly referable: worked out again next time)
        _SEEN[fn] = reason
    return reason


def _reason(fn: Callable[..., Any]) -> str | None:
    target = _code_owner(fn)
    code = getattr(target, "__code__", None)
    # (a lambda is one expression: it cannot forget a return, its None is what it says)
    if not isinstance(code, types.CodeType) or code.co_name == "<lambda>":
        return None
    if code.co_flags & _NO_VALUE or not _no_value_returned(code):
        return None
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # (an annotation that does not resolve says nothing here)
        hints = {}
    if "return" in hints and _admits_none(hints["return"]):
        return None  # (a stub that says it returns None, e.g. `-> str | None: pass`)
    return "it has no `return <value>` statement"


def _code_owner(fn: Any) -> Any:
    """The Python function whose code runs when ``fn`` is called: a partial's function, a bound
    method's, a callable object's ``__call__``; through a wrapper that has no Python code of its
    own (``functools.lru_cache``) to the function it wraps."""
    for _ in range(16):
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, types.MethodType):
            fn = fn.__func__
        elif isinstance(fn, types.FunctionType):
            return fn
        elif isinstance(fn, staticmethod | classmethod):
            fn = fn.__func__
        elif getattr(fn, "__wrapped__", None) is not None:
            fn = fn.__wrapped__
        elif callable(fn) and not isinstance(fn, type | types.BuiltinFunctionType):
            fn = type(fn).__dict__.get("__call__") or _class_call(type(fn))
        else:
            return None
    return None


def _class_call(cls: type) -> Any:
    return next((c.__dict__["__call__"] for c in cls.__mro__ if "__call__" in c.__dict__), None)


def _no_value_returned(code: types.CodeType) -> bool:
    """Whether every ``return`` in ``code`` (not in functions nested in it) returns ``None``. A
    ``return`` that a jump reaches may return what another path left (``return x if c else None``
    shares one), so it counts as returning a value."""
    before: dis.Instruction | None = None
    for ins in dis.get_instructions(code):
        if ins.opname == "RETURN_VALUE":
            if ins.is_jump_target or before is None or before.opname != "LOAD_CONST":
                return False
            if before.argval is not None:
                return False
        elif ins.opname == "RETURN_CONST" and ins.argval is not None:
            return False
        before = ins
    return True


def _admits_none(t: Any) -> bool:
    """Whether a return annotation says ``None`` is a value the function gives (not ``-> None``
    alone, which says it gives nothing)."""
    if t is None or t is type(None):
        return False
    return _with_none(t)


def _with_none(t: Any) -> bool:
    if t is Any or t is None or t is type(None) or isinstance(t, typing.TypeVar):
        return True
    origin = typing.get_origin(t)
    if origin is typing.Annotated:
        return _with_none(typing.get_args(t)[0])
    if origin is typing.Union or origin is types.UnionType:
        return any(_with_none(a) for a in typing.get_args(t))
    if origin is typing.Literal:
        return None in typing.get_args(t)
    for alias in ("__value__", "__supertype__"):  # (a type alias statement, a NewType)
        inner = getattr(t, alias, None)
        if inner is not None:
            return _with_none(inner)
    if isinstance(t, type):
        try:
            return isinstance(None, t)  # (object, collections.abc.Hashable, ...)
        except TypeError:
            return False
    return False
