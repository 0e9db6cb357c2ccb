"""Whether ``None`` returned by a function stage with one declared output can be meant.

A function stage declared with a single output (``@stage(writes=["answer"])``) may return that
output's value on its own. A function that forgot its ``return`` then returns ``None``, and without
a check that ``None`` would be written as the answer: a silent wrong result. :func:`none_is_wrong`
says when such a ``None`` cannot be meant:

- the function has no ``return <value>`` anywhere in its body (only a bare ``return``, ``return
  None`` or the end of the body), so ``None`` is all it can return (a lambda is one expression: its ``None``
  is meant);
- its return annotation leaves ``None`` out (``-> str``; not ``-> str | None``, ``-> Any``, ``->
  object`` or a type variable).

Otherwise (a function that returns a value on some path and has no annotation saying it never
returns ``None``) the ``None`` is written, as the stage returned it. Returning ``{"answer": None}``
always writes ``None`` on purpose.

>>> def forgot(question: str):
...     question.upper()
>>> none_is_wrong(forgot)
'it has no `return <value>` statement'
>>> def typed(question: str) -> str:
...     return question.upper() if question else None  # type: ignore[return-value]
>>> none_is_wrong(typed)
"it is annotated to return 'str'"
>>> def maybe(question: str) -> str | None:
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
    if target is None:
        return None
    code = getattr(target, "__code__", None)
    # (a lambda is one expression: it cannot forget a return, its None is what it says)
    if code is None or getattr(code, "co_name", "") == "<lambda>":
        return None
    if isinstance(code, types.CodeType) and not code.co_flags & _NO_VALUE and _no_value_returned(code):
        return "it has no `return <value>` statement"
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # (an annotation that does not resolve says nothing here)
        return None
    if "return" not in hints or _admits_none(hints["return"]):
        return None
    return f"it is annotated to return {_type_name(hints['return'])!r}"


def _code_owner(fn: Any) -> Any:
    """The Python function whose code runs when ``fn`` is called (through ``functools.wraps``
    wrappers, partials and bound methods; a callable object's ``__call__``)."""
    for _ in range(16):
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif isinstance(fn, types.MethodType):
            fn = fn.__func__
        elif isinstance(fn, types.FunctionType):
            wrapped = getattr(fn, "__wrapped__", None)
            if wrapped is None:
                return fn
            fn = wrapped
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
    if t is Any or t is object or t is None or t is type(None) or isinstance(t, typing.TypeVar):
        return True
    origin = typing.get_origin(t)
    if origin is typing.Annotated:
        return _admits_none(typing.get_args(t)[0])
    if origin is typing.Union or origin is types.UnionType:
        return any(_admits_none(a) for a in typing.get_args(t))
    if origin is typing.Literal:
        return None in typing.get_args(t)
    return False


def _type_name(t: Any) -> str:
    return t.__name__ if isinstance(t, type) and not typing.get_args(t) else str(t).replace("typing.", "")
