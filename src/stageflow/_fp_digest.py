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

import contextlib
import dataclasses
import hashlib
import inspect
import os
import re
import sys
import sysconfig
import threading
import types
import weakref
from collections.abc import Iterator
from typing import Any

from pydantic_core import PydanticUndefined

from stageflow._fp_code import assigned_attributes, code_digest
from stageflow._fp_types import describe_type, models_in, validator_of

__all__ = [
    "ADAPTER_SETTINGS",
    "Bag",
    "Ref",
    "code_digest",
    "code_info",
    "current",
    "field_view",
    "is_user_class",
    "is_user_module",
    "own_attributes",
    "recording_views",
    "same",
    "state_of",
    "user_classes",
    "views_hold",
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


#: Attributes of DSPy modules and LMs that record runs rather than configure behaviour.
_RUN_RECORDS = frozenset({"history", "callbacks", "_compiled"})


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

_CODE_INFO: weakref.WeakKeyDictionary[types.CodeType, tuple[bool, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)
_SIG_DIGESTS: weakref.WeakKeyDictionary[Any, tuple[Any, Any, str]] = weakref.WeakKeyDictionary()


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


def is_user_class(cls: type) -> bool:
    return is_user_module(cls.__module__)


def _is_library_class(cls: type) -> bool:
    return not is_user_module(cls.__module__)


def own_attributes(obj: Any, state: dict[str, Any]) -> list[tuple[str, Any]]:
    """The instance attributes of ``obj`` (a predictor or LM of *your* subclass) that your code set:
    those the library classes it derives from do not assign themselves (see
    :func:`~stageflow._fp_code.assigned_attributes`). Run records (``history``, ``callbacks``) are
    left out."""
    library = assigned_attributes(type(obj), _is_library_class)
    return [(k, v) for k, v in state.items() if k not in library and k not in _RUN_RECORDS]


def user_classes(cls: type) -> tuple[type, ...]:
    """The classes of ``cls``'s MRO that are your code (not the standard library, an installed
    package, stageflow or DSPy)."""
    return tuple(c for c in cls.__mro__ if c is not object and is_user_module(c.__module__))


class _Held:
    """A field default that is not plain text, a number or a flag: compared by identity and by its
    text as it was (see :func:`_text`: a list default replaced, or edited in place, is a change;
    ``==`` is never called, so an array's ``==`` cannot fail the comparison). Held strongly, so its
    identity is not reused while a view holds it. The text is made on every fingerprint: a huge
    default costs its ``repr`` each time."""

    __slots__ = ("obj", "text")

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.text = _text(obj)

    def __eq__(self, other: object) -> bool:
        return type(other) is _Held and other.obj is self.obj and other.text == self.text

    __hash__ = None  # type: ignore[assignment]


_ADDRESS = re.compile(r" (?:object )?at 0x[0-9a-fA-F]+")


def _text(obj: Any) -> str:
    """What a default says about itself, stable across processes: its ``str`` (what DSPy sends for an
    object it cannot serialise) and ``repr`` (without a memory address), and a pydantic model's or
    dataclass's fields in full (``repr=False`` fields are still sent)."""
    parts = []
    for show in (str, repr):
        try:
            parts.append(_ADDRESS.sub(" at <address>", show(obj)))
        except Exception:  # (an object that cannot be shown)
            parts.append("<unshowable>")
    try:
        dump = getattr(obj, "model_dump", None)
        if callable(dump) and isinstance(type(obj), type):
            parts.append(repr(dump(mode="json")))
        elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            parts.append(repr(dataclasses.asdict(obj)))
    except Exception:
        parts.append("<undumpable>")
    return "\x00".join(parts)


def _default(value: Any) -> Any:
    """A field default in a view: text, an int, a flag or None with its type (``1`` is not
    ``True``), a float by its ``repr`` (``-0.0`` is not ``0.0``), anything else held (see
    :class:`_Held`)."""
    t = type(value)
    if t in _PLAIN_DEFAULTS:
        return (t, value)
    return (t, repr(value)) if t is float else _Held(value)


_PLAIN_DEFAULTS = frozenset({str, int, bool, type(None)})


def field_view(sig: Any) -> tuple[Any, ...]:
    """What a signature's fields are now, cheap to build and compare: the field names; each field's
    type (by identity: ``Literal["a", "b"]`` reordered is another type), default (a plain value with
    its type, ``1`` is not ``True``; anything else by identity and ``repr``) and DSPy settings
    (description, prefix, kind); and the validators of the pydantic models the types name (a model
    rebuilt with other fields gets a new one). A field edited in place on the same signature class
    (``Sig.model_fields["style"].default = "short"``, a description changed in its
    ``json_schema_extra``) gives another view. (Compared with ``==``: a settings value whose ``==`` is
    not a bool raises, which callers take as a change.)"""
    table = sig.__pydantic_fields__
    try:
        memo = _VIEWS.get(sig)
    except TypeError:  # (not weakly referenceable: built every time)
        memo = None
    if memo is None or not memo.holds(table):
        view, models = _build_view(table)
        with contextlib.suppress(TypeError):
            _VIEWS[sig] = _ViewMemo(table, view, models)
    else:
        view = memo.view
    recording = _USED.views
    if recording is not None:
        recording.append((sig, view))
    return view


def _build_view(table: dict[str, Any]) -> tuple[tuple[Any, ...], list[Any]]:
    """A signature's field view (see :func:`field_view`), and the pydantic models its types name."""
    fields = table.values()
    try:
        rows = [
            (
                a := f.annotation,
                id(a),  # (a is held in the same row: its identity is not reused meanwhile)
                d if (d := f.default) is PydanticUndefined else _default(d),
                tuple(f.json_schema_extra.items()),
            )
            for f in fields
        ]
    except AttributeError:  # (a field without DSPy's settings dict)
        rows = [
            (
                a := f.annotation,
                id(a),
                d if (d := f.default) is PydanticUndefined else _default(d),
                tuple(x.items()) if isinstance(x := f.json_schema_extra, dict) else x,
            )
            for f in fields
        ]
    models = models_in([row[0] for row in rows])
    return (tuple(table), *rows, tuple([validator_of(m) for m in models]) if models else ()), models


class _ViewMemo:
    """A signature's last :func:`field_view` and what it was built from, so that an unchanged
    signature costs a few identity checks per field: the fields table and each field object, its
    type, default and settings dict by identity, the settings' content (a description edited in the
    dict is a change), a non-plain default's text, and the named models' validators."""

    __slots__ = ("checks", "models", "names", "table", "view")

    def __init__(self, table: dict[str, Any], view: tuple[Any, ...], models: list[Any]) -> None:
        self.table = table
        self.names = view[0]
        self.view = view
        self.checks = tuple(
            (
                f,
                f.annotation,
                f.default,
                x := f.json_schema_extra,
                dict(x) if type(x) is dict else None,
                row[2] if type(row[2]) is _Held else None,
            )
            for f, row in zip(table.values(), view[1 : 1 + len(table)], strict=True)
        )
        self.models = tuple((m, validator_of(m)) for m in models)

    def holds(self, table: dict[str, Any]) -> bool:
        """Whether the signature's fields are still what :attr:`view` describes."""
        if table is not self.table or tuple(table) != self.names:
            return False
        try:
            for f, (f0, annotation, default, extra, settings, held) in zip(
                table.values(), self.checks, strict=True
            ):
                if (
                    f is not f0
                    or f.annotation is not annotation
                    or f.default is not default
                    or f.json_schema_extra is not extra
                    or (settings is not None and extra != settings)
                    or (held is not None and _text(default) != held.text)
                ):
                    return False
        except (TypeError, ValueError):  # (a settings value whose == is not a bool: built again)
            return False
        return all(validator_of(m) is v for m, v in self.models)


#: signature class -> its last field view (see _ViewMemo)
_VIEWS: weakref.WeakKeyDictionary[Any, _ViewMemo] = weakref.WeakKeyDictionary()


def same(a: Any, b: Any) -> bool:
    """``a == b`` for tokens, where a value whose ``==`` is not a bool (an array) counts as a change."""
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


class _Recording(threading.local):
    views: list[tuple[Any, Any]] | None = None  # (a class default: no exception when unset)


_USED = _Recording()


@contextlib.contextmanager
def recording_views() -> Iterator[list[tuple[Any, Any]]]:
    """Collect the ``(signature, field view)`` pairs :func:`field_view` makes inside (see
    :func:`views_hold`)."""
    outer = _USED.views
    views: list[tuple[Any, Any]] = []
    _USED.views = views
    try:
        yield views
    finally:
        _USED.views = outer


def views_hold(seen: list[tuple[Any, Any]], used: list[tuple[Any, Any]]) -> bool:
    """Whether every signature view in ``used`` (recorded by :func:`recording_views` while hashing)
    is the view ``seen`` recorded of the same signature (while the change-detection token was made):
    then the hash describes the fields the token saw, even if another thread edited them and edited
    them back in between."""
    return all(any(s is sig and same(v, view) for s, v in seen) for sig, view in used)


def _signature_digest(sig: Any) -> str:
    doc, view = sig.__doc__, field_view(sig)
    known = _SIG_DIGESTS.get(sig)
    if known is not None and known[0] is doc and same(known[1], view):
        return known[2]
    # (described from the view itself, not from the fields read again: another thread editing a
    # field meanwhile cannot pair this view with another state's digest)
    # (the instructions from the doc read above, as DSPy's ``instructions`` makes them: a doc edited
    # by another thread meanwhile cannot pair with this digest either)
    digest = _describe_view(inspect.cleandoc(doc) if isinstance(doc, str) else sig.instructions, view)
    _SIG_DIGESTS[sig] = (doc, view, digest)
    return digest


def _describe_view(instructions: str, view: tuple[Any, ...]) -> str:
    """The digest of a signature from its instructions and :func:`field_view`: inputs then outputs,
    each with its name, type by definition, DSPy settings and default (when it has one)."""
    names = view[0]
    groups: dict[str, list[Any]] = {"input": [], "output": []}
    for name, (annotation, _, default, extra) in zip(names, view[1 : 1 + len(names)], strict=True):
        items = extra if type(extra) is tuple else tuple((extra or {}).items())
        group = groups.get(dict(items).get("__dspy_field_type"))  # type: ignore[arg-type]
        if group is None:  # (neither an input nor an output: DSPy's field tables leave it out)
            continue
        kind = "in" if group is groups["input"] else "out"
        entry: tuple[Any, ...] = (
            kind,
            name,
            describe_type(annotation),
            sorted((str(k), repr(v)) for k, v in items),
        )
        if default is not PydanticUndefined:  # (an input's default decides what DSPy sends)
            text = default.text if type(default) is _Held else repr(default[1])
            entry = (*entry, ("default", text))
        group.append(entry)
    text = repr((instructions, groups["input"] + groups["output"]))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


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
