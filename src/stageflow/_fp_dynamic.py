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
import types
import weakref
from typing import Any

from stageflow._fp_digest import code_info

__all__ = ["dynamic_reads", "dynamic_text"]

#: Builtins through which code reads names it computes at run time.
_DYNAMIC = frozenset({"globals", "vars", "eval", "exec"})
_LIMIT = 200  # functions followed per stage
_MEMO: weakref.WeakKeyDictionary[Any, list[str]] = weakref.WeakKeyDictionary()


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
        if isinstance(item, types.FunctionType):
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
    if any(n in _DYNAMIC and n not in g for n in names):
        found.append(fn.__qualname__)
    stack.extend(v for n in names if isinstance(v := g.get(n), types.FunctionType))
    for cell in fn.__closure__ or ():
        try:
            value = cell.cell_contents
        except ValueError:  # (an empty cell)
            continue
        if isinstance(value, types.FunctionType):
            stack.append(value)
