"""Functions of yours that look module-level names up at run time (internal).

:func:`stageflow.fingerprint` follows the module-level names a function's code reads by name
(``RATE``, ``cfg.FACTOR``). A function that computes the name — ``globals()["RATE"]``,
``vars()[name]``, ``eval("RATE")``, ``exec(...)`` — reads values the fingerprint cannot know of, so
a cache key or a batch journal would not notice when they change. :func:`dynamic_reads` finds such
functions among those a stage runs (its function, the helper functions it calls by name or holds in
its closure, the methods of your module classes), so the cache and batch runs can say so.

Example:
    >>> RATE = 2
    >>> def price(x):
    ...     return x * globals()["RATE"]
    >>> def plain(x):
    ...     return x * RATE
    >>> dynamic_reads(price), dynamic_reads(plain)
    (['price'], [])
"""

from __future__ import annotations

import contextlib
import dis
import functools
import types
import weakref
from typing import Any

from stageflow._fp_digest import code_info, is_user_class, is_user_module

__all__ = ["dynamic_reads", "dynamic_text"]

#: Builtins through which code reads names it computes at run time.
_DYNAMIC = frozenset({"globals", "vars", "eval", "exec"})
_LIMIT = 200  # functions followed per stage
_MEMO: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()
_CALLS: weakref.WeakKeyDictionary[types.CodeType, frozenset[str]] = weakref.WeakKeyDictionary()


def dynamic_reads(obj: Any) -> list[str]:
    """The qualified names of the functions of yours ``obj`` runs that look names up at run time
    (remembered per object)."""
    try:
        known = _MEMO.get(obj)
    except TypeError:
        known = None
    if known is not None:
        return known
    found = _walk(obj)
    with contextlib.suppress(TypeError):  # (not weakly referable: worked out again next time)
        _MEMO[obj] = found
    return found


def dynamic_text(functions: list[str]) -> str:
    """``globals()``, ``vars()``, ``eval`` or ``exec`` in the functions named, for a message."""
    shown = ", ".join(f"{name}()" for name in functions[:3]) + (", ..." if len(functions) > 3 else "")
    return f"globals(), vars(), eval or exec in {shown}"


def _walk(obj: Any) -> list[str]:
    found: list[str] = []
    seen: set[int] = set()
    stack = [obj]
    while stack and len(seen) < _LIMIT:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, types.MethodType):
            item = item.__func__
        if isinstance(item, functools.partial):
            stack.append(item.func)
        elif isinstance(item, types.FunctionType):
            _function(item, found, stack)
        elif hasattr(item, "fn") and callable(item.fn):  # a function stage
            stack.append(item.fn)
        elif hasattr(item, "module") and hasattr(item, "input_map"):  # a Stage wrapper
            stack.append(item.module)
        elif hasattr(item, "underlying_stage"):  # a LazyStage
            stack.append(item.underlying_stage)
        else:
            cls = type(item)
            stack.extend(v for v in vars(cls).values() if isinstance(v, types.FunctionType))
    return found


def _function(fn: types.FunctionType, found: list[str], stack: list[Any]) -> None:
    user, names = code_info(fn.__code__)
    if not user:
        return
    g = fn.__globals__
    if any(n not in g for n in _dynamic_calls(fn.__code__)):  # (the builtins, not names of yours)
        found.append(fn.__qualname__)
    for n in names:
        _follow(g.get(n), names, stack)
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # (an empty cell)
            continue
        _follow(value, names, stack)


def _follow(value: Any, names: tuple[str, ...], stack: list[Any]) -> None:
    """What a function runs through a name it reads: a function, a ``functools.partial``'s function,
    the functions of a module of yours that its code names (``helpers.rate()``), the methods of an
    object of your class (``PRICER.price(x)``)."""
    if isinstance(value, types.ModuleType):
        if is_user_module(value.__name__):
            for n in names:
                attr = getattr(value, n, None)
                if not isinstance(attr, types.ModuleType):
                    _follow(attr, names, stack)
    elif isinstance(value, types.FunctionType | functools.partial):
        stack.append(value)
    elif value is not None and not isinstance(value, type) and is_user_class(type(value)):
        stack.extend(f for f in vars(type(value)).values() if isinstance(f, types.FunctionType))


def _dynamic_calls(code: types.CodeType) -> frozenset[str]:
    """The builtins ``code`` (and the code nested in it) loads by name to look names up at run time:
    ``globals``, ``eval``, ``exec``, and ``vars`` called with no argument (``vars(obj)`` reads an
    object's attributes). An attribute of the same name (``model.eval()``) is not one."""
    known = _CALLS.get(code)
    if known is not None:
        return known
    hits: set[str] = set()
    for c in _codes(code):
        ops = list(dis.get_instructions(c))
        for i, op in enumerate(ops):
            if op.opname not in ("LOAD_GLOBAL", "LOAD_NAME") or op.argval not in _DYNAMIC:
                continue
            if op.argval == "vars":
                call = next((o for o in ops[i + 1 :] if o.opname in ("PRECALL", "CALL")), None)
                if call is None or call.arg != 0:
                    continue
            hits.add(str(op.argval))
    known = frozenset(hits)
    _CALLS[code] = known
    return known


def _codes(code: types.CodeType) -> list[types.CodeType]:
    out, stack = [], [code]
    while stack:
        c = stack.pop()
        out.append(c)
        stack.extend(x for x in c.co_consts if isinstance(x, types.CodeType))
    return out
