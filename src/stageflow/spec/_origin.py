"""Where an object is defined: the check behind the module allowlist.

A pipeline file names objects by a path through an allowed module (``"pkg.mod:Helper.make"``). What
matters is not how the name is spelled but where the object it reaches is *defined*: an allowed
module also holds the modules it imported, functions and classes it re-exports, and objects of
foreign classes. :func:`lookup` walks the path one attribute at a time without running any code
(no properties, no ``__getattr__`` of objects), and :func:`vet` refuses every object on the way
whose code lives outside the allowed modules:

* a module: its ``__name__`` is allowed and it is that module in ``sys.modules``;
* a function: ``__module__`` is allowed *and* its ``__globals__`` are that module's namespace
  (``__module__`` can be reassigned; the globals a function runs with cannot);
* a class: ``__module__`` is allowed, the module holds the class (by ``__qualname__`` or in its
  namespace), and every function defined in the class body runs with an allowed module's globals;
* a bound method: its function and the object it is bound to;
* a builtin function: only one that belongs to an allowed extension module;
* a ``@stageflow.stage`` function, or a function decorated with ``functools.wraps`` /
  ``functools.cache``: the function it wraps (``__wrapped__``);
* any other object: its class (plain data such as numbers, strings and containers pass, and are
  refused later as "not a stage").

What an allowed class inherits is the allowed module's own choice and is not checked.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Sequence
from types import BuiltinFunctionType, FunctionType, MethodType, ModuleType
from typing import Any

__all__ = ["ComponentRefError", "is_allowed", "lookup", "vet"]

_DATA = (int, float, complex, str, bytes, bool, type(None), list, tuple, dict, set, frozenset)


class ComponentRefError(Exception):
    """A component reference cannot be used; ``code`` and ``hint`` say why (turned into a SpecError)."""

    def __init__(self, message: str, code: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


def is_allowed(module: str, allow_modules: Sequence[str]) -> bool:
    """``True`` when ``module`` is an allowed module or inside an allowed package.

    >>> is_allowed("mypkg.stages", ["mypkg"]), is_allowed("mypkgx", ["mypkg"])
    (True, False)
    """
    return any(module == a or module.startswith(a + ".") for a in allow_modules if a)


def _describe(obj: Any) -> str:
    if isinstance(obj, ModuleType):
        return f"the module '{obj.__name__}'"
    if isinstance(obj, type):
        return f"the class {obj.__qualname__}"
    if isinstance(obj, FunctionType | BuiltinFunctionType | MethodType):
        return f"the function {getattr(obj, '__qualname__', obj)}"
    return f"an object of class {type(obj).__qualname__}"


def _refuse(shown: str, obj: Any, home: str, allow: Sequence[str], why: str = "") -> ComponentRefError:
    allowed = ", ".join(repr(a) for a in allow)
    where = "" if isinstance(obj, ModuleType) else f", defined in '{home}'"
    return ComponentRefError(
        f"'{shown}' is {_describe(obj)}{why}{where}, which is not an allowed module (allowed: {allowed}). "
        "A pipeline file may only use what the allowed modules define, not what they import.",
        code="outside_allowed_modules",
        hint="write a function in your module that does what you need and name that function; allow "
        f"'{home.split('.')[0]}' itself (--allow-module) only if you trust everything in it",
    )


def _module_of(name: Any) -> ModuleType | None:
    module = sys.modules.get(name) if isinstance(name, str) else None
    return module if isinstance(module, ModuleType) else None


def _function_home(fn: FunctionType) -> str:
    """The module a Python function's code runs in (its globals), whatever ``__module__`` says."""
    name = fn.__globals__.get("__name__")
    return name if isinstance(name, str) else "<unknown module>"


def _vet_function(fn: FunctionType, shown: str, allow: Sequence[str], why: str = "") -> None:
    home = _function_home(fn)
    module = _module_of(home)
    if not (is_allowed(home, allow) and module is not None and vars(module) is fn.__globals__):
        raise _refuse(shown, fn, home, allow, why)


def _held_by(module: ModuleType, cls: type) -> bool:
    obj: Any = module
    for part in cls.__qualname__.split("."):
        obj = vars(obj).get(part) if isinstance(obj, ModuleType | type) else None
    return obj is cls or any(value is cls for value in vars(module).values())


def _vet_class(cls: type, shown: str, allow: Sequence[str], what: Any = None) -> None:
    what = cls if what is None else what
    home = cls.__module__ if isinstance(cls.__module__, str) else "<unknown module>"
    module = _module_of(home)
    if not (is_allowed(home, allow) and module is not None and _held_by(module, cls)):
        raise _refuse(shown, what, home, allow)
    for name, value in vars(cls).items():
        fn = value.__func__ if isinstance(value, staticmethod | classmethod) else value
        # A method written in this class body (qualname "Cls.name") runs with the globals of the module
        # whose code it is: a class that claims another module (``__module__ = ...``) shows here.
        # Functions merely stored on the class (``helper = other.func``) are checked when named.
        if isinstance(fn, FunctionType) and fn.__qualname__.startswith(f"{cls.__qualname__}."):
            inner = inspect.unwrap(fn)
            home = _function_home(inner if isinstance(inner, FunctionType) else fn)
            if not is_allowed(home, allow):
                raise _refuse(shown, what, home, allow, f" whose method {name}() is")


def _unwrapped(obj: Any) -> FunctionType | None:
    """The function at the end of ``obj``'s ``__wrapped__`` chain (read statically), if it has one."""
    if isinstance(obj, type | ModuleType):
        return None
    seen: set[int] = set()
    while (inner := inspect.getattr_static(obj, "__wrapped__", None)) is not None and id(obj) not in seen:
        seen.add(id(obj))
        obj = inner
    return obj if seen and isinstance(obj, FunctionType) else None


def vet(obj: Any, shown: str, allow: Sequence[str]) -> None:
    """Raise :class:`ComponentRefError` unless ``obj`` is defined in an allowed module (see above)."""
    from stageflow.stages import FunctionStage

    if type(obj) in _DATA:
        return
    inner = _unwrapped(obj)
    if inner is not None:  # a decorated function (functools.wraps, functools.cache...): judge what it wraps
        _vet_function(inner, shown, allow, " (decorated)")
        return
    if isinstance(obj, ModuleType):
        if not (is_allowed(obj.__name__, allow) and sys.modules.get(obj.__name__) is obj):
            raise _refuse(shown, obj, obj.__name__, allow)
    elif isinstance(obj, type):
        _vet_class(obj, shown, allow)
    elif isinstance(obj, FunctionType):
        _vet_function(obj, shown, allow)
    elif isinstance(obj, MethodType):
        vet(obj.__func__, shown, allow)
        vet(obj.__self__, shown, allow)
    elif isinstance(obj, BuiltinFunctionType):
        owner = obj.__self__
        home = owner.__name__ if isinstance(owner, ModuleType) else type(owner).__module__
        if not (isinstance(owner, ModuleType) and is_allowed(home, allow)):
            raise _refuse(shown, obj, home, allow, " (built into Python)")
    elif type(obj) is FunctionStage:  # @stageflow.stage: what runs is the function it wraps
        if isinstance(obj.fn, FunctionType):
            _vet_function(obj.fn, shown, allow, " wrapped by @stageflow.stage")
        else:
            vet(obj.fn, shown, allow)
    else:
        _vet_class(type(obj), shown, allow, obj)


def lookup(obj: Any, part: str, shown: str, allow: Sequence[str]) -> Any:
    """``getattr(obj, part)`` without running code the allowed modules did not define.

    Module attributes come from the module's namespace (or its own module-level ``__getattr__``,
    which is vetted first); class and instance attributes are read statically, functions and
    classmethods are bound by hand, and properties or other descriptors are refused.

    Raises:
        AttributeError: no such attribute.
        ComponentRefError: the attribute is a property/descriptor, or a vetted ``__getattr__`` failed.
    """
    if isinstance(obj, ModuleType):
        namespace = vars(obj)
        if part in namespace:
            return namespace[part]
        hook = namespace.get("__getattr__")
        if hook is None:
            raise AttributeError(part)
        vet(hook, f"{shown} (the module's __getattr__)", allow)
        try:
            return hook(part)
        except AttributeError:
            raise
        except Exception as exc:
            raise ComponentRefError(
                f"looking up '{shown}' failed: {type(exc).__name__}: {exc}", code="component_import_failed"
            ) from exc
    raw = inspect.getattr_static(obj, part)
    if isinstance(raw, staticmethod):
        return raw.__func__
    if isinstance(raw, classmethod):
        return MethodType(raw.__func__, obj if isinstance(obj, type) else type(obj))
    if isinstance(raw, FunctionType):
        return raw if isinstance(obj, type) else MethodType(raw, obj)
    if not isinstance(raw, type) and hasattr(type(raw), "__get__"):
        kind = "a property" if isinstance(raw, property) else f"a descriptor ({type(raw).__name__})"
        raise ComponentRefError(
            f"'{shown}' is {kind}: reading it runs code. A pipeline file may name modules, functions, "
            "classes and objects, not properties or descriptors.",
            code="outside_allowed_modules",
            hint="name a function or class the allowed module defines, or add a factory function to it "
            "that returns what you need",
        )
    return raw
