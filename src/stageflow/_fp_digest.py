"""Stable descriptions for :func:`stageflow.fingerprint` (internal): code and signature digests,
weak references compared by identity, and where code comes from (yours or a library's).

A *token* (see :mod:`stageflow._fp_walker`) is nested tuples of plain values and :class:`Ref` weak
references to immutable things that are expensive to describe (code objects, DSPy signature
classes). Two tokens compare equal only if every plain value is equal and every reference points
to the very same live object, so an equal token means an equal content hash — and a remembered
token never keeps anything alive. :meth:`Ref.describe` turns a reference into stable text when the
content hash is computed.
"""

from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
import types
import weakref
from typing import Any

__all__ = [
    "ADAPTER_SETTINGS",
    "Bag",
    "Ref",
    "code_digest",
    "code_info",
    "current",
    "is_user_module",
    "state_of",
    "weaken",
]


#: What DSPy's adapters are configured with (see ``dspy.ChatAdapter.__init__``); other attributes of
#: an adapter subclass (counters, caches) are not part of a fingerprint, its code is.
ADAPTER_SETTINGS = frozenset(
    {
        "use_native_function_calling",
        "parallel_tool_calls",
        "native_response_types",
        "use_json_adapter_fallback",
        "extraction_model",
    }
)


class Ref:
    """A weak reference compared by identity (never by the referent's own ``==``).

    It equals another ``Ref`` to the same live object, or that object itself: a token built for
    one call may hold plain classes (cheaper), the remembered token holds ``Ref`` s (see
    :func:`weaken`).
    """

    __slots__ = ("ref",)

    def __init__(self, obj: Any) -> None:
        self.ref = weakref.ref(obj)

    def __eq__(self, other: object) -> bool:
        obj = self.ref()
        if obj is None:
            return False
        return obj is (other.ref() if type(other) is Ref else other)

    __hash__ = None  # type: ignore[assignment]

    def describe(self) -> str:
        obj = self.ref()
        if obj is None:  # pragma: no cover - the walker holds the program while hashing
            return "<gone>"
        if isinstance(obj, types.CodeType):
            return code_digest(obj)
        return _signature_digest(obj)


class Bag(tuple):  # type: ignore[type-arg]
    """Items whose order carries no meaning (a set): the content hash sorts them."""

    __slots__ = ()


def weaken(token: Any) -> Any:
    """``token`` with every class in it replaced by a :class:`Ref` (so remembering it keeps
    nothing alive); it still compares equal to the original."""
    t = type(token)
    if t is tuple or t is Bag:
        items = [weaken(x) for x in token]
        return tuple(items) if t is tuple else Bag(items)
    if isinstance(token, type):
        return Ref(token)
    return token


# -- code and signatures ---------------------------------------------------------------------------

_CODE_DIGESTS: weakref.WeakKeyDictionary[types.CodeType, str] = weakref.WeakKeyDictionary()
_CODE_INFO: weakref.WeakKeyDictionary[types.CodeType, tuple[bool, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)
_SIG_DIGESTS: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


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
    argument layout and flags — not its file name or line numbers."""
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


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    for name in ("stageflow", "dspy"):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__file__", None):
            dirs.add(os.path.dirname(module.__file__ or ""))
    return tuple(os.path.join(d, "") for d in dirs if d)


_LIB_DIRS: list[tuple[str, ...]] = []
_USER_MODULES: dict[str, bool] = {}


def _is_library_file(filename: str) -> bool:
    if not _LIB_DIRS:
        _LIB_DIRS.append(_library_dirs())
    return filename.startswith(("<frozen", *_LIB_DIRS[0]))


def code_info(code: types.CodeType) -> tuple[bool, tuple[str, ...]]:
    """``(is_user_code, names it and its nested code objects read)``."""
    info = _CODE_INFO.get(code)
    if info is None:
        names: set[str] = set()
        stack = [code]
        while stack:
            c = stack.pop()
            names.update(c.co_names)
            stack.extend(x for x in c.co_consts if isinstance(x, types.CodeType))
        info = (not _is_library_file(code.co_filename), tuple(sorted(names)))
        _CODE_INFO[code] = info
    return info


def is_user_module(name: str) -> bool:
    known = _USER_MODULES.get(name)
    if known is None:
        module = sys.modules.get(name)
        if module is None:  # not a real module (exec'd code): user code, not remembered
            return True
        filename = getattr(module, "__file__", None)
        if filename is None:
            known = name == "__main__"
        else:
            known = not _is_library_file(os.path.abspath(filename))
        _USER_MODULES[name] = known
    return known


def _signature_digest(sig: Any) -> str:
    digest = _SIG_DIGESTS.get(sig)
    if digest is None:
        fields = []
        for kind, group in (("in", sig.input_fields), ("out", sig.output_fields)):
            for name, f in group.items():
                extra = sorted((str(k), repr(v)) for k, v in (f.json_schema_extra or {}).items())
                fields.append((kind, name, repr(f.annotation), extra))
        text = repr((sig.instructions, fields))
        digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
        _SIG_DIGESTS[sig] = digest
    return digest


def current() -> tuple[Any, Any]:
    """The LM and adapter ``dspy.context``/``dspy.configure`` provide right now."""
    settings = sys.modules.get("dspy.dsp.utils.settings")
    if settings is None:
        return None, None
    main = settings.main_thread_config
    overrides = settings.thread_local_overrides.get()
    if not overrides:
        return main.get("lm"), main.get("adapter")
    return overrides.get("lm", main.get("lm")), overrides.get("adapter", main.get("adapter"))


state_of = object.__getattribute__  # a dspy.Module's __dict__ without its Python-level __getattribute__
