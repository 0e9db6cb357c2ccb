"""The on-disk format of cached values: JSON with typed tags. Reading it can never run code.

A persistent cache file is data: whoever can write it must not be able to make the reader run a
command (a pickle can). :func:`dumps` writes JSON where every value that JSON cannot say exactly
is a tagged object, so a round trip gives back the same types:

- ``null``/``true``/``false``, ints, floats (``1`` stays an int, ``1.0`` a float; NaN and
  infinities too), strings and lists are plain JSON;
- ``{"$t": "tuple"|"set"|"frozenset"|"dict"|"bytes"|"bytearray"|"complex"|"datetime"|"date"|
  "time"|"timedelta"|"decimal"|"uuid", "v": ...}`` for the builtin and stdlib types (a dict is a
  list of ``[key, value]`` pairs, so its keys keep their types);
- ``{"$t": "prediction"|"example"|"result", ...}`` for ``dspy.Prediction``/``dspy.Example`` and
  stageflow's result type;
- ``{"$t": "ndarray"|"npscalar", "dtype": ..., "shape": ..., "v": base64}`` for numpy values
  (not ``dtype=object``);
- ``{"$t": "model"|"dataclass"|"enum"|"namedtuple", "cls": "module:QualName", ...}`` for pydantic
  models, dataclasses, enums and named tuples.

Decoding builds only those types. A class named in a file is looked up in an **allowlist** — the
classes this process has itself encoded, plus those given to :func:`allow` — and never imported;
an unknown name is an :class:`UnknownType` (the caller treats it as a miss). Pydantic models are
rebuilt with ``model_construct`` and dataclasses field by field, so no validator or ``__init__``
runs. What :func:`dumps` cannot encode raises :class:`Unencodable`.

Examples:
    >>> text = dumps({"y": (1, 2.0), 3: b"x"})
    >>> loads(text)
    {'y': (1, 2.0), 3: b'x'}
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import json
import sys
import threading
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["DecodeError", "Unencodable", "UnknownType", "allow", "dumps", "loads"]

FORMAT = 1
_MAX_DEPTH = 200


class Unencodable(Exception):  # noqa: N818 - a signal: keep this output in memory only
    """A value has no encoding in the on-disk format."""

    def __init__(self, type_name: str, reason: str = "no encoding in the cache file format") -> None:
        super().__init__(type_name, reason)
        self.type_name = type_name
        self.reason = reason


class DecodeError(Exception):
    """A stored value is not in the format (damaged, foreign, or written by something else)."""


class UnknownType(DecodeError):  # noqa: N818 - a kind of DecodeError, named for what it says
    """A stored value names a class that is not on the allowlist of this process."""


_ALLOWED: dict[str, type] = {}
_ALLOWED_LOCK = threading.Lock()


def _path(cls: type) -> str:
    if "<locals>" in cls.__qualname__:
        raise Unencodable(f"{cls.__module__}.{cls.__qualname__}", "a class defined inside a function")
    return f"{cls.__module__}:{cls.__qualname__}"


def allow(*classes: type) -> None:
    """Allow decoding these classes (pydantic models, dataclasses, enums, named tuples).

    Classes this process encodes are allowed automatically; call this so a fresh process can read
    entries of classes it has not produced yet.
    """
    with _ALLOWED_LOCK:
        for cls in classes:
            _ALLOWED[_path(cls)] = cls


def _named(cls: type) -> str:
    path = _path(cls)
    if _ALLOWED.get(path) is not cls:
        with _ALLOWED_LOCK:
            _ALLOWED[path] = cls
    return path


# -- encoding -------------------------------------------------------------------------------------


def dumps(value: Any) -> str:
    """``value`` as format text (raises :class:`Unencodable`)."""
    doc = {"stageflow": FORMAT, "value": _enc(value, 0)}
    return json.dumps(doc, separators=(",", ":"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _pairs(items: Iterable[tuple[Any, Any]], depth: int) -> list[list[Any]]:
    return [[_enc(k, depth), _enc(v, depth)] for k, v in items]


def _enc(v: Any, depth: int) -> Any:
    t = type(v)
    if t is str or t is int or t is bool or t is float or v is None:
        return v
    if depth > _MAX_DEPTH:
        raise Unencodable(t.__name__, "nested too deeply (or cyclic)")
    d = depth + 1
    if t is list:
        return [_enc(x, d) for x in v]
    if t is dict:
        return {"$t": "dict", "v": _pairs(v.items(), d)}
    if t is tuple or t is set or t is frozenset:
        return {"$t": t.__name__, "v": [_enc(x, d) for x in v]}
    if t is bytes or t is bytearray:
        return {"$t": t.__name__, "v": _b64(bytes(v))}
    if t is complex:
        return {"$t": "complex", "v": [v.real, v.imag]}
    simple = _enc_stdlib(v, t)
    if simple is not None:
        return simple
    return _enc_object(v, t, d)


def _enc_stdlib(v: Any, t: type) -> dict[str, Any] | None:
    if t is datetime.datetime or t is datetime.time:
        if v.tzinfo is not None and type(v.tzinfo) is not datetime.timezone:
            raise Unencodable(
                f"datetime with tzinfo {type(v.tzinfo).__name__}", "only fixed-offset time zones"
            )
        return {"$t": t.__name__, "v": v.isoformat()}
    if t is datetime.date:
        return {"$t": "date", "v": v.isoformat()}
    if t is datetime.timedelta:
        return {"$t": "timedelta", "v": [v.days, v.seconds, v.microseconds]}
    if t is decimal.Decimal:
        return {"$t": "decimal", "v": str(v)}
    if t is uuid.UUID:
        return {"$t": "uuid", "v": str(v)}
    return None


def _enc_object(v: Any, t: type, d: int) -> Any:
    if isinstance(v, enum.Enum):
        return {"$t": "enum", "cls": _named(t), "v": v.name}
    if t.__module__ == "numpy":
        return _enc_numpy(v, t)
    if isinstance(v, tuple) and hasattr(t, "_fields"):
        return {"$t": "namedtuple", "cls": _named(t), "v": [_enc(x, d) for x in v]}
    record = _record_kind(t)
    if record is not None:
        return _enc_record(v, t, record, d)
    fields = getattr(t, "model_fields", None)
    if isinstance(fields, dict) and hasattr(v, "model_dump"):
        extra = getattr(v, "__pydantic_extra__", None)
        private = getattr(v, "__pydantic_private__", None)
        node = {
            "$t": "model",
            "cls": _named(t),
            "v": _pairs(((k, getattr(v, k)) for k in fields), d),
            "set": sorted(v.model_fields_set),
            "extra": None if extra is None else _pairs(extra.items(), d),
        }
        if private:
            node["private"] = _pairs(private.items(), d)
        return node
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        names = [f.name for f in dataclasses.fields(v)]
        items = ((k, getattr(v, k)) for k in names)
        node = {"$t": "dataclass", "cls": _named(t), "v": _pairs(items, d)}
        extra = [(k, x) for k, x in getattr(v, "__dict__", {}).items() if k not in names]
        if extra:  # attributes set on the instance besides its fields
            node["extra"] = _pairs(extra, d)
        return node
    raise Unencodable(f"{t.__module__}.{t.__qualname__}")


def _record_kind(t: type) -> str | None:
    names = {(c.__module__, c.__name__) for c in t.__mro__}
    if ("stageflow.state", "Result") in names:
        return "result" if (t.__module__, t.__name__) == ("stageflow.state", "Result") else "unknown"
    if not any(m.startswith("dspy.") and n in ("Example", "Prediction") for m, n in names):
        return None
    if t.__name__ in ("Prediction", "Example") and t.__module__.startswith("dspy."):
        return t.__name__.lower()
    return "unknown"


def _enc_record(v: Any, t: type, kind: str, d: int) -> dict[str, Any]:
    if kind == "unknown":
        raise Unencodable(f"{t.__module__}.{t.__qualname__}", "a subclass of dspy.Example/Prediction")
    node: dict[str, Any] = {"$t": kind, "v": _pairs(v._store.items(), d)}
    if kind == "example":
        keys = v.__dict__.get("_input_keys")
        node["inputs"] = None if keys is None else sorted(keys)
    completions = v.__dict__.get("_completions")
    if completions is not None:
        node["completions"] = _pairs(completions._completions.items(), d)
    return node


def _enc_numpy(v: Any, t: type) -> dict[str, Any]:
    dtype = getattr(v, "dtype", None)
    if dtype is None or dtype.kind in "OV":
        raise Unencodable(f"numpy.{t.__name__}", "object or structured dtype")
    if t.__name__ == "ndarray":
        return {"$t": "ndarray", "dtype": dtype.str, "shape": list(v.shape), "v": _b64(v.tobytes())}
    if not isinstance(v, sys.modules["numpy"].generic):  # np.matrix, np.memmap: would decode as another type
        raise Unencodable(f"numpy.{t.__name__}", "an ndarray subclass (return a plain ndarray to persist it)")
    return {"$t": "npscalar", "dtype": dtype.str, "v": _b64(v.tobytes())}


# -- decoding -------------------------------------------------------------------------------------


def loads(text: Any, allowed: Mapping[str, type] | None = None) -> Any:
    """Decode format text (raises :class:`DecodeError`; :class:`UnknownType` for a class that is
    not allowed). Never imports a module and never runs a validator or ``__init__``."""
    if not isinstance(text, str):
        raise DecodeError(f"a stored value is {type(text).__name__}, not format text")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DecodeError(f"not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("stageflow") != FORMAT or "value" not in doc:
        raise DecodeError("not a stageflow cache value (format tag missing or from another version)")
    try:
        return _Decoder(allowed or {}).dec(doc["value"], 0)
    except DecodeError:
        raise
    except Exception as e:  # wrong shapes anywhere in a crafted document
        raise DecodeError(f"malformed value: {type(e).__name__}: {e}") from None


class _Decoder:
    def __init__(self, allowed: Mapping[str, type]) -> None:
        self.allowed = allowed

    def cls(self, node: dict[str, Any], check: Any) -> Any:
        path = node["cls"]
        cls = self.allowed.get(path) or _ALLOWED.get(path)
        if cls is None:
            raise UnknownType(f"class {path!r} is not allowed in this process")
        if not check(cls):
            raise DecodeError(f"class {path!r} does not match the tag {node['$t']!r}")
        return cls

    def pairs(self, items: Any, depth: int) -> list[tuple[Any, Any]]:
        return [(self.dec(k, depth), self.dec(v, depth)) for k, v in items]

    def dec(self, node: Any, depth: int) -> Any:
        if node is None or isinstance(node, str | int | float):
            return node
        if depth > _MAX_DEPTH:
            raise DecodeError("nested too deeply")
        d = depth + 1
        if isinstance(node, list):
            return [self.dec(x, d) for x in node]
        if not isinstance(node, dict):
            raise DecodeError(f"unexpected JSON {type(node).__name__}")
        tag = node.get("$t")
        handler = _HANDLERS.get(tag) if isinstance(tag, str) else None
        if handler is None:
            raise DecodeError(f"unknown tag {tag!r}")
        return handler(self, node, d)


def _record(decoder: _Decoder, node: dict[str, Any], d: int) -> Any:
    import dspy
    from dspy.primitives.prediction import Completions

    from stageflow.state import Result, RunInfo

    kind = node["$t"]
    cls = {"prediction": dspy.Prediction, "example": dspy.Example, "result": Result}[kind]
    obj = cls.__new__(cls)
    state: dict[str, Any] = {"_store": dict(decoder.pairs(node["v"], d))}
    if kind == "example":
        keys = node.get("inputs")
        state.update(_demos=[], _input_keys=None if keys is None else {str(k) for k in keys})
    else:
        state.update(_completions=None, _lm_usage=None)
        if node.get("completions") is not None:
            c = Completions.__new__(Completions)
            c.__dict__.update(signature=None, _completions=dict(decoder.pairs(node["completions"], d)))
            state["_completions"] = c
        if kind == "result":
            state["_run"] = RunInfo()
    obj.__dict__.update(state)
    return obj


def _model(decoder: _Decoder, node: dict[str, Any], d: int) -> Any:
    cls = decoder.cls(node, lambda c: isinstance(getattr(c, "model_fields", None), dict))
    values = dict(decoder.pairs(node["v"], d))
    if node.get("extra"):
        values.update(decoder.pairs(node["extra"], d))
    obj = cls.model_construct(_fields_set={str(f) for f in node.get("set") or ()}, **values)
    if node.get("private"):
        private = dict(decoder.pairs(node["private"], d))
        object.__setattr__(obj, "__pydantic_private__", {**(obj.__pydantic_private__ or {}), **private})
    return obj


def _dataclass(decoder: _Decoder, node: dict[str, Any], d: int) -> Any:
    cls = decoder.cls(node, lambda c: dataclasses.is_dataclass(c) and c.__new__ is object.__new__)
    values = dict(decoder.pairs(node["v"], d))
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name not in values:
            raise DecodeError(f"dataclass field {f.name!r} is missing")
        object.__setattr__(obj, f.name, values[f.name])
    for k, x in decoder.pairs(node.get("extra") or [], d):
        object.__setattr__(obj, str(k), x)
    return obj


def _numpy(decoder: _Decoder, node: dict[str, Any], d: int) -> Any:
    import numpy as np

    dtype = np.dtype(str(node["dtype"]))
    if dtype.kind in "OV":
        raise DecodeError("object or structured numpy dtype")
    data = base64.b64decode(node["v"], validate=True)
    if node["$t"] == "npscalar":
        return np.frombuffer(data, dtype=dtype)[0]
    return np.frombuffer(data, dtype=dtype).reshape([int(n) for n in node["shape"]]).copy()


def _time(kind: str) -> Any:
    def parse(decoder: _Decoder, node: dict[str, Any], d: int) -> Any:
        return getattr(datetime, kind).fromisoformat(str(node["v"]))

    return parse


_HANDLERS: dict[str, Any] = {
    "dict": lambda dec, n, d: dict(dec.pairs(n["v"], d)),
    "tuple": lambda dec, n, d: tuple(dec.dec(x, d) for x in n["v"]),
    "set": lambda dec, n, d: {dec.dec(x, d) for x in n["v"]},
    "frozenset": lambda dec, n, d: frozenset(dec.dec(x, d) for x in n["v"]),
    "bytes": lambda dec, n, d: base64.b64decode(n["v"], validate=True),
    "bytearray": lambda dec, n, d: bytearray(base64.b64decode(n["v"], validate=True)),
    "complex": lambda dec, n, d: complex(float(n["v"][0]), float(n["v"][1])),
    "datetime": _time("datetime"),
    "date": _time("date"),
    "time": _time("time"),
    "timedelta": lambda dec, n, d: datetime.timedelta(*(int(x) for x in n["v"])),
    "decimal": lambda dec, n, d: decimal.Decimal(str(n["v"])),
    "uuid": lambda dec, n, d: uuid.UUID(str(n["v"])),
    "enum": lambda dec, n, d: dec.cls(n, lambda c: issubclass(c, enum.Enum))[str(n["v"])],
    "namedtuple": lambda dec, n, d: dec.cls(n, lambda c: issubclass(c, tuple) and hasattr(c, "_fields"))(
        *(dec.dec(x, d) for x in n["v"])
    ),
    "prediction": _record,
    "example": _record,
    "result": _record,
    "model": _model,
    "dataclass": _dataclass,
    "ndarray": _numpy,
    "npscalar": _numpy,
}
