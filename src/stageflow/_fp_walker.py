"""The walker behind :func:`stageflow.fingerprint` (internal): a program → a token, or the complete
description that is hashed (see :mod:`stageflow._fp_digest` for tokens and references)."""

from __future__ import annotations

import array
import collections
import dataclasses
import functools
import hashlib
import itertools
import sys
import types
from typing import Any

from stageflow._fp_digest import (
    ADAPTER_SETTINGS,
    Bag,
    Ref,
    code_info,
    current,
    field_view,
    is_user_class,
    is_user_module,
    own_attributes,
    state_of,
)
from stageflow._fp_types import describe_type
from stageflow._untracked import Untracked
from stageflow.patterns._containers import StageDict, StageList

__all__ = ["Walker"]

_BUDGET = 2000  # values followed per token; beyond it containers are sampled
_MAX_DEPTH = 24
_SAMPLE = 8
_LONG = 1024  # strings and bytes longer than this are hashed in the full description
#: Attributes of every dspy.Module that record runs rather than configure behaviour.
_MODULE_NOISE = frozenset({"history", "callbacks", "_compiled"})
#: Objects that observe or store runs; they never change a stage's outputs.
_SKIP = frozenset(
    {
        "stageflow.policies.cache.CachePolicy",
        "stageflow.policies.cache.MemoryStore",
        "stageflow.policies.stores.SQLiteStore",
        "stageflow.observe.profiler.Profiler",
        "stageflow.observe.tracer.Tracer",
    }
)


# -- the walker ------------------------------------------------------------------------------------

_BUILTIN_CALLABLES = (
    types.BuiltinFunctionType,
    types.MethodDescriptorType,
    types.WrapperDescriptorType,
    types.MethodWrapperType,
    types.ClassMethodDescriptorType,
)
_MUTABLE = (list, dict, set, bytearray)
_MUTABLE_KINDS = (list, dict, set, bytearray, collections.deque, array.array)
_SIMPLE = frozenset({str, int, type(None)})
#: Token tags of plain data (no code, no module, no object inside).
_PLAIN_TAGS = frozenset({"f", "b", "bytes", "data", "complex", "example", "record", "opaque"})


#: Dunder entries of a class body that are code (``__call__``, ``__init__``...): part of its description;
#: the other dunder entries (``__module__``, ``__dict__``, ``__doc__``...) are bookkeeping, left out.
_CODE_KINDS = frozenset(
    {
        types.FunctionType,
        staticmethod,
        classmethod,
        property,
        functools.partialmethod,
        functools.cached_property,
    }
)


def _digest(v: Any, t: type, final: bool) -> Any:
    """A digest of all of a container too big to follow item by item, when its items are hashable
    (a table of text and numbers): Python's own hash in a token (compared in this process only), a
    sha256 of its text in the description that is hashed (``None`` when there is neither: then only
    its length and a sample describe it)."""
    try:
        if not final:
            if t is dict:
                return hash((tuple(v), tuple(v.values())))
            return hash(frozenset(v)) if t is set or t is frozenset else hash(tuple(v))
        text = repr(sorted(map(repr, v))) if t is set or t is frozenset else repr(v)
    except Exception:  # (unhashable items: a list of lists)
        return None
    if " at 0x" in text:  # an object's default repr: not its content
        return None
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _spelled(v: Any, final: bool) -> str | None:
    """The text of an object whose state cannot be read (``re.compile('a+')``, ``Decimal('1.5')``,
    ``datetime.date(2026, 1, 2)``): library classes spell their value out in their ``repr``. ``None``
    when it is the default ``<... at 0x...>`` (nothing about the value) or cannot be made."""
    try:
        text = repr(v)
    except Exception:
        return None
    if " at 0x" in text:
        return None
    if final and len(text) > _LONG:
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return text


def _is_data(v: Any) -> bool:
    """Whether the plain items of this container may be changed in place (a pipeline's own list
    of stages is structure, not data)."""
    t = type(v)
    return t is not StageList and t is not StageDict and isinstance(v, _MUTABLE_KINDS)


def _container_base(v: Any) -> type | None:
    """The plain container type ``v`` is walked as, when it is a container of another class."""
    if isinstance(v, dict):
        return dict
    if isinstance(v, list | collections.deque | array.array):
        return list
    if isinstance(v, set):
        return set
    if isinstance(v, frozenset):
        return frozenset
    if isinstance(v, tuple):
        return tuple
    return None


def _is_plain(token: Any) -> bool:
    if type(token) is not tuple:
        return True
    if not token:
        return True
    tag = token[0]
    if tag == "tuple":
        return all(_is_plain(x) for x in token[1:])
    if tag == "frozenset":
        return all(_is_plain(x) for x in token[1])
    return tag in _PLAIN_TAGS


class Walker:
    """Builds one token (``final=False``) or the complete description that is hashed (``final=True``).

    The two differ in one respect: plain data *inside a mutable container* (a list, dict or set a
    function captures or an object holds) is part of the full description but not of the token —
    so a stage that appends to a captured list on every call keeps its fingerprint, while the
    fingerprint still differs between two programs (or two runs) whose containers differ. What a
    predictor holds (demos, LM settings, config) is always compared in full: editing a demo in place
    changes the token. ``id()`` is used only for objects kept alive during this walk.
    """

    def __init__(
        self,
        final: bool = False,
        *,
        full: bool | None = None,
        record: bool = False,
    ) -> None:
        self.final = final  # the description to hash: long strings are hashed, everything is kept
        self.full = final if full is None else full  # keep plain data inside mutable containers
        self.budget = _BUDGET
        self.active: set[int] = set()
        #: Whether plain data was left out of this token (a mutable container's items, an array).
        self.elided = False
        #: With ``record``: every list, dict and set walked, ``id -> (it, its token, enclosing one's id)``.
        self.seen: dict[int, tuple[Any, Any, int | None]] | None = {} if record else None
        self.enclosing: list[int] = []

    def token(self, obj: Any) -> Any:
        dspy = sys.modules.get("dspy")
        if dspy is not None and issubclass(type(obj), dspy.Predict):  # the common case, directly
            return self.predict(obj, 1)
        return self.tok(obj, 0)

    def tok(self, v: Any, depth: int) -> Any:
        t = type(v)
        if t is str or t is int or v is None:
            if self.final and t is str and len(v) > _LONG:
                return ("str-sha256", hashlib.sha256(v.encode("utf-8", "surrogatepass")).hexdigest())
            return v
        self.budget -= 1
        if t is float:
            return ("f", v.hex())
        if t is bool:
            return ("b", int(v))
        if t is bytes:
            return ("bytes", hashlib.sha256(v).hexdigest() if self.final and len(v) > _LONG else v)
        if depth > _MAX_DEPTH:
            return ("deep", t.__qualname__)
        d = depth + 1
        if t is list or t is tuple or t is dict or t is set or t is frozenset:
            return self.container(v, t, d)
        if t is StageList or t is StageDict:  # a pipeline's stages: a plain list / dict with a counter
            return self.items(v, list if t is StageList else dict, d)
        if t is types.FunctionType:
            return self.function(v, d)
        if t is types.MethodType:
            return ("method", self.tok(v.__func__, d), self.tok(v.__self__, d))
        if isinstance(v, _BUILTIN_CALLABLES):
            return ("builtin", getattr(v, "__module__", None), getattr(v, "__qualname__", repr(v)))
        if t is types.ModuleType:
            return ("module", v.__name__)
        if t is types.CodeType:
            return ("code", Ref(v))
        if isinstance(v, type):
            return self.cls(v, d)
        if t is staticmethod or t is classmethod:
            return (t.__name__, self.tok(v.__func__, d))
        if t is property:
            return ("property", self.tok(v.fget, d), self.tok(v.fset, d))
        if t is functools.partial:
            return ("partial", self.tok(v.func, d), self.tok(v.args, d), self.tok(v.keywords, d))
        if t is bytearray:
            if not self.full:
                self.elided = True
                return ("data", "bytearray")
            return ("bytearray", hashlib.sha256(v).hexdigest() if self.final else bytes(v))
        if t is complex:
            return ("complex", v.real.hex(), v.imag.hex())
        if isinstance(v, Untracked):  # a stage's own log or counter: not what decides its outputs
            return ("untracked", t.__qualname__)
        base = _container_base(v)
        if base is not None:
            return self.subclass(v, t, base, d)
        return self.obj(v, t, d)

    def subclass(self, v: Any, t: type, base: type, d: int) -> Any:
        """A container of another class (``OrderedDict``, ``defaultdict``, ``Counter``, ``deque``,
        ``array``, a named tuple, a dict or list subclass of yours): its class, its items as its
        base's, and what else it holds (a ``defaultdict``'s factory, attributes of your subclass)."""
        name = f"{t.__module__}.{t.__qualname__}"
        extra: list[Any] = []
        factory = getattr(v, "default_factory", None)
        if factory is not None:
            extra.append(("default_factory", self.tok(factory, d)))
        if t is array.array:
            extra.append(("typecode", v.typecode))
        try:
            state = state_of(v, "__dict__")
        except AttributeError:
            state = None
        if state:
            extra.extend((k, self.tok(x, d)) for k, x in list(state.items()))
        kind = self.cls(t, d) if is_user_module(t.__module__) else name
        return ("container", kind, self.container(v, base, d), tuple(extra))

    def container(self, v: Any, t: type, d: int) -> Any:
        if t in _MUTABLE and self.seen is not None:
            return self.data(v, t, d)
        return self.items(v, t, d)

    def data(self, v: Any, t: type, d: int) -> Any:
        """A list, dict or set when changes to data are looked for: recorded with its token."""
        key = id(v)
        seen = self.seen
        if seen is None:
            return self.items(v, t, d)
        enclosing = self.enclosing
        outer = enclosing[-1] if enclosing else None
        enclosing.append(key)
        try:
            out = self.items(v, t, d)
        finally:
            enclosing.pop()
        seen[key] = (v, out, outer)
        return out

    def items(self, v: Any, t: type, d: int) -> Any:
        items: Any = v.items() if t is dict else v
        n = len(v)
        if n > self.budget:  # too big to follow: type, length and a sample
            unordered = t is set or t is frozenset
            step = max(1, n // _SAMPLE)
            if unordered:
                sample = []
            elif t is dict:
                sample = list(itertools.islice(items, 0, step * _SAMPLE, step))
            else:  # (a slice of a list copies only the sample; a deque or an array is walked)
                sample = list(
                    v[::step][:_SAMPLE]
                    if type(v) in (list, tuple)
                    else itertools.islice(v, 0, step * _SAMPLE, step)
                )
            out = [self.tok(x, d) for x in sample]
            if not self.full and t in _MUTABLE and all(_is_plain(x) for x in out):
                self.elided = True
                return ("data", t.__name__)
            return ("sampled", t.__name__, n, _digest(v, t, self.final), *out)
        if t is dict:
            if self.final:
                pairs = [(self.tok(k, d), self.tok(x, d)) for k, x in items]
            else:  # plain keys and values inline: a token is built on every cached call
                tok = self.tok
                pairs = [
                    (k if type(k) in _SIMPLE else tok(k, d), x if type(x) in _SIMPLE else tok(x, d))
                    for k, x in items
                ]
            if self.full:
                return ("dict", *pairs)
            kept = [p for p in pairs if not _is_plain(p[1])]
            self.elided = self.elided or _is_data(v)  # (empty too: it may be filled in place)
            return ("data", "dict") if not kept else ("dict", *kept)
        if self.final:
            out = [self.tok(x, d) for x in items]
        else:
            tok = self.tok
            out = [x if type(x) in _SIMPLE else tok(x, d) for x in items]
        if not self.full and t in _MUTABLE:
            kept = [x for x in out if not _is_plain(x)]
            self.elided = self.elided or _is_data(v)  # (empty too: it may be filled in place)
            out = kept
            if not out:
                return ("data", t.__name__)
        if t is set or t is frozenset:
            return (t.__name__, Bag(out))
        return (t.__name__, *out)

    def function(self, f: Any, d: int) -> Any:
        code = f.__code__
        user, names = code_info(code)
        if not user:
            return ("libfn", f.__module__, f.__qualname__)
        key = id(f)
        if key in self.active:
            return ("recursive", f.__qualname__)
        self.active.add(key)
        try:
            cells = f.__closure__
            g = f.__globals__
            return (
                "fn",
                Ref(code),
                self.tok(f.__defaults__, d),
                self.exact(f.__kwdefaults__, d),
                tuple(self.cell(c, d) for c in cells) if cells else (),
                tuple((n, self.global_(g[n], names, d)) for n in names if n in g),
            )
        finally:
            self.active.discard(key)

    def global_(self, v: Any, names: tuple[str, ...], d: int) -> Any:
        """A global a function reads; a module of yours with the attributes the code may read
        through it (``cfg.FACTOR``: every name the code uses that the module defines)."""
        if type(v) is not types.ModuleType or not is_user_module(v.__name__):
            return self.tok(v, d)
        key = id(v)
        if key in self.active or d > _MAX_DEPTH:
            return ("module", v.__name__)
        self.active.add(key)
        try:
            attrs = v.__dict__
            return (
                "usermodule",
                v.__name__,
                tuple((a, self.global_(attrs[a], names, d + 1)) for a in names if a in attrs),
            )
        finally:
            self.active.discard(key)

    def cell(self, c: Any, d: int) -> Any:
        try:
            return self.tok(c.cell_contents, d)
        except ValueError:
            return ("empty",)

    def cls(self, c: type, d: int) -> Any:
        dspy = sys.modules.get("dspy")
        if dspy is not None and issubclass(c, dspy.Signature) and c is not dspy.Signature:
            return ("signature", Ref(c), c.__doc__, None if self.final else field_view(c))
        if not is_user_module(c.__module__):
            return ("class", c.__module__, c.__qualname__)
        key = id(c)
        if key in self.active:
            return ("class", c.__module__, c.__qualname__)
        self.active.add(key)
        try:
            body = [
                (k, self.tok(v, d))
                for k, v in c.__dict__.items()
                if k[:2] != "__" or type(v) in _CODE_KINDS or k == "__annotations__"
            ]
            bases = [self.cls(b, d) for b in c.__bases__ if b is not object]
            if dataclasses.is_dataclass(c) or isinstance(c.__dict__.get("__pydantic_fields__"), dict):
                body.append(("<fields>", describe_type(c)))  # defaults a model keeps out of its __dict__
            return ("userclass", c.__module__, c.__qualname__, tuple(bases), tuple(body))
        finally:
            self.active.discard(key)

    def obj(self, v: Any, t: type, d: int) -> Any:
        name = f"{t.__module__}.{t.__qualname__}"
        if name in _SKIP:
            return ("skip", name)
        dspy = sys.modules.get("dspy")
        if dspy is not None:
            if issubclass(t, dspy.Predict):
                return self.predict(v, d)
            if issubclass(t, dspy.BaseLM):
                return self.lm(v, d)
            if issubclass(t, dspy.Example):
                keys = v.__dict__.get("_input_keys")
                return ("example", name, self.exact(v._store, d), None if keys is None else Bag(sorted(keys)))
        if t.__module__ == "numpy" and hasattr(v, "dtype") and hasattr(v, "tobytes"):
            return self.array(v)
        key = id(v)
        if key in self.active:
            return ("recursive", name)
        user = is_user_module(t.__module__)
        try:
            state = state_of(v, "__dict__")
        except AttributeError:
            state = None
        if isinstance(v, types.MappingProxyType):  # a read-only view of a dict: its items
            return ("mappingproxy", self.container(dict(v), dict, d))
        if state is None:
            slots = [s for c in t.__mro__ for s in getattr(c, "__slots__", ()) if hasattr(v, s)]
            if not slots:  # a value of a library class (a compiled regex, a Decimal, a date...)
                return ("opaque" if not callable(v) else "callable", name, _spelled(v, self.final))
            state = {s: getattr(v, s) for s in slots}
        self.active.add(key)
        try:
            # A pipeline names what its engine keeps on it for itself (plans, checks done, memos) and
            # the private attributes that decide what it does (defaults set with set_defaults, a
            # ParallelPipeline's grouping, a branch chosen by default).
            own = getattr(t, "_stageflow_bookkeeping", ())
            content = getattr(t, "_stageflow_content", ())
            items = [
                (k, self.tok(x, d))
                for k, x in list(state.items())
                if k not in _MODULE_NOISE
                and k not in own
                and (user or k[:1] != "_" or k == "__wrapped__" or k in content)
            ]
        finally:
            self.active.discard(key)
        if not user and not items:  # nothing public to read (a Fraction, a path): what its text says
            return ("opaque" if not callable(v) else "callable", name, _spelled(v, self.final))
        # A callable object (a module, a processor) is structure; anything else is a record of data.
        return ("object" if callable(v) else "record", self.cls(t, d) if user else name, tuple(items))

    def array(self, v: Any) -> Any:
        if not self.full:  # data, like a list of numbers (a stage may keep a log of its inputs)
            self.elided = True
            return ("data", "ndarray")
        kind = type(v).__name__
        if v.dtype.hasobject:
            return ("ndarray", kind, v.dtype.str, v.shape, repr(v.tolist()))
        data = v.tobytes()
        return (
            "ndarray",
            kind,
            v.dtype.str,
            v.shape,
            hashlib.sha256(data).hexdigest() if self.final else data,
        )

    def exact(self, v: Any, d: int) -> Any:
        """``v`` compared in full, in either mode (a predictor's state)."""
        if not v and (type(v) is list or type(v) is dict):
            return (type(v).__name__,)
        full, self.full = self.full, True
        try:
            return self.tok(v, d)
        finally:
            self.full = full

    def predict(self, p: Any, d: int) -> Any:
        state = state_of(p, "__dict__")
        sig = state.get("signature")
        lm, adapter = current()
        lm = state.get("lm") or lm
        t = type(p)
        return (
            "predict",
            t.__module__,
            t.__qualname__,
            sys.modules["dspy"].__version__,
            None if sig is None else Ref(sig),
            None if sig is None else sig.__doc__,  # the raw instructions (cheaper than .instructions)
            None if sig is None or self.final else field_view(sig),  # (fields edited in place)
            self.demos(state.get("demos"), d),
            None if lm is None else self.lm(lm, d),
            self.exact(state.get("config"), d),
            None if adapter is None else self.adapter(adapter, d),
            self.own(p, state, d) if is_user_class(t) else None,
        )

    def own(self, obj: Any, state: dict[str, Any], d: int) -> Any:
        """For an instance of your own subclass of a DSPy predictor or LM: your class's code and the
        attributes your code set (see :func:`~stageflow._fp_digest.own_attributes`)."""
        key = id(obj)
        if key in self.active:
            return ("recursive", type(obj).__qualname__)
        self.active.add(key)
        try:
            attrs = tuple((k, self.tok(v, d)) for k, v in own_attributes(obj, state))
            return ("own", self.cls(type(obj), d), attrs)
        finally:
            self.active.discard(key)

    def demos(self, demos: Any, d: int) -> Any:
        """A predictor's demos, compared in full; the usual demo (an Example of strings) inline."""
        if self.final or type(demos) is not list:
            return self.exact(demos, d)
        out: list[Any] = []
        for ex in demos:
            state = getattr(ex, "__dict__", None)
            store = state.get("_store") if state is not None else None
            if type(store) is dict and not [x for x in store.values() if type(x) is not str]:
                keys = state.get("_input_keys") if state is not None else None
                out.append(
                    ("demo", type(ex), tuple(store.items()), None if keys is None else frozenset(keys))
                )
            else:
                out.append(self.exact(ex, d))
        return ("list", *out)

    def adapter(self, a: Any, d: int) -> Any:
        """The adapter's class (its code, for your own subclasses) and DSPy's adapter settings; other
        attributes of a subclass (counters, caches) are left out."""
        settings = tuple((k, self.exact(v, d)) for k, v in vars(a).items() if k in ADAPTER_SETTINGS)
        return ("adapter", self.cls(type(a), d), settings)

    def lm(self, lm: Any, d: int) -> Any:
        t = type(lm)
        own = None
        if is_user_class(t):  # your LM class: its code and the attributes your code set (weights...)
            state = getattr(lm, "__dict__", None)
            own = self.own(lm, state, d) if type(state) is dict else self.cls(t, d)
        return (
            "lm",
            t.__module__,
            t.__qualname__,
            getattr(lm, "model", None),
            getattr(lm, "model_type", None),
            self.exact(getattr(lm, "kwargs", None), d),
            own,
            getattr(lm, "stageflow_identity", None),  # (a fake LM's script: stageflow.testing.FakeLM)
        )
