"""Canonical, type-exact cache keys for stage inputs.

:func:`freeze` turns an input value into a hashable key that equals another key only when the two
values are the same value *of the same type*: ``1``, ``True`` and ``1.0`` are three different keys
(Python's own ``==`` and ``hash`` treat them as one), ``{'a': 1}`` and ``[['a', 1]]`` differ, and so
do ``(1, 2)`` and ``[1, 2]``. Objects are keyed by their content — numpy arrays by dtype, shape and
bytes, pydantic models by class and fields, dataclasses by class and fields — never by ``repr``,
which can be truncated (``numpy`` elides the middle of large arrays) or identical for different
objects. A value with no canonical encoding raises :class:`Unkeyable`; the caller then does not
cache that call.

The frozen form is a tree of ``str``/``int``/``None`` leaves and tuples whose first item is a tag,
so two different values can never freeze to equal keys. :func:`durable_text` renders it as
canonical JSON for keys that must be equal across processes (persistent stores).

Examples:
    >>> freeze(1) == freeze(True), freeze(1) == freeze(1.0), freeze((1,)) == freeze([1])
    (False, False, False)
    >>> freeze({"a": [1, 2.5]})
    ('dict', ('a', ('list', 1, ('float', '0x1.4000000000000p+1'))))
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import decimal
import enum
import fractions
import json
import pathlib
import sys
import uuid
from typing import Any

__all__ = ["EXACT_REPR", "NotDurable", "Unkeyable", "durable_text", "freeze"]

_MAX_DEPTH = 64

#: Exact types whose ``repr`` is complete and canonical (it round-trips).
EXACT_REPR: frozenset[type] = frozenset(
    {
        datetime.datetime,
        datetime.date,
        datetime.time,
        datetime.timedelta,
        datetime.timezone,
        decimal.Decimal,
        uuid.UUID,
        fractions.Fraction,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        pathlib.PosixPath,
        pathlib.WindowsPath,
        range,
        slice,
    }
)


class Unkeyable(Exception):  # noqa: N818 - a signal between the key builder and the cache, not an error
    """A value has no canonical encoding (or is cyclic / nested too deeply).

    Attributes:
        where: Where inside the input the value sits (``"[2].meta"``), filled in on the way out.
        type_name: The offending value's type.
    """

    def __init__(self, type_name: str, reason: str = "no canonical encoding") -> None:
        super().__init__(type_name, reason)
        self.type_name = type_name
        self.reason = reason
        self.where = ""


class NotDurable(Exception):  # noqa: N818 - a signal, not an error
    """A key is fine in memory but has no spelling that is stable across processes (a local class)."""


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def freeze(value: Any, depth: int = 0) -> Any:
    """The type-exact, hashable key of ``value`` (see the module docstring).

    Raises:
        Unkeyable: ``value`` (or something inside it) has no canonical encoding.
    """
    t = type(value)
    if t is str or t is int or value is None:
        return value
    if depth > _MAX_DEPTH:
        raise Unkeyable(t.__name__, f"nested deeper than {_MAX_DEPTH} levels (or cyclic)")
    d = depth + 1
    try:
        if t is float:
            return ("float", value.hex())
        if t is bool:
            return ("bool", int(value))
        if t is list:
            return ("list", *[freeze(v, d) for v in value])
        if t is tuple:
            return ("tuple", *[freeze(v, d) for v in value])
        if t is dict:
            return ("dict", *[(freeze(k, d), freeze(v, d)) for k, v in value.items()])
        if t is bytes:
            return ("bytes", value)
        if t is set or t is frozenset:
            return (t.__name__, frozenset(freeze(v, d) for v in value))
        if t is bytearray:
            return ("bytearray", bytes(value))
        if t is complex:
            return ("complex", value.real.hex(), value.imag.hex())
        return _freeze_object(value, t, d)
    except Unkeyable as e:
        raise _located(e, value, t) from None


def _located(error: Unkeyable, container: Any, t: type) -> Unkeyable:
    """Best-effort location of the failing item inside ``container`` (only on the error path)."""
    if error.reason.startswith("nested"):
        return error  # too deep or cyclic: searching again would only hit the limit again
    if t is list or t is tuple:
        for i, v in enumerate(container):
            if _fails(v):
                error.where = f"[{i}]{error.where}"
                break
    elif t is dict:
        for k, v in container.items():
            if _fails(v):
                error.where = f"[{k!r}]{error.where}"
                break
    return error


def _fails(value: Any) -> bool:
    try:
        freeze(value, _MAX_DEPTH // 2)
    except Unkeyable:
        return True
    return False


def _freeze_object(value: Any, t: type, d: int) -> Any:
    if isinstance(value, enum.Enum):
        return ("enum", t, value.name)
    if t in EXACT_REPR:
        return ("repr", t, repr(value))
    if isinstance(value, type):
        return ("class", value)
    np = sys.modules.get("numpy")
    if np is not None and isinstance(value, np.ndarray | np.generic):
        return _freeze_numpy(np, value, t, d)
    if isinstance(value, tuple) and hasattr(t, "_fields"):  # a namedtuple
        return ("namedtuple", t, *[freeze(v, d) for v in value])
    store = getattr(value, "_store", None)
    if type(store) is dict and _is_example(value):
        keys = getattr(value, "_input_keys", None)
        frozen_keys = None if keys is None else tuple(sorted(keys))
        return ("example", t, frozen_keys, *[(k, freeze(v, d)) for k, v in store.items()])
    fields = getattr(t, "model_fields", None)
    if isinstance(fields, dict) and hasattr(value, "model_dump"):  # pydantic v2
        extra = getattr(value, "__pydantic_extra__", None) or {}
        items = [(k, freeze(getattr(value, k), d)) for k in fields]
        items += [(k, freeze(v, d)) for k, v in extra.items()]
        # Private attributes (``_secret: str = PrivateAttr()``) are state a method may read.
        private = getattr(value, "__pydantic_private__", None) or {}
        items += [(("private", k), freeze(v, d)) for k, v in private.items()]
        return ("model", t, *items)
    if dataclasses.is_dataclass(value):
        names = [f.name for f in dataclasses.fields(value)]
        # Attributes set on the instance besides its fields (``obj.extra = ...``) are state too.
        extra = sorted(k for k in getattr(value, "__dict__", {}) if k not in names)
        return (
            "dataclass",
            t,
            *[(k, freeze(getattr(value, k), d)) for k in names],
            *[(("extra", k), freeze(value.__dict__[k], d)) for k in extra],
        )
    raise Unkeyable(_qualname(t))


def _is_example(value: Any) -> bool:
    return any(c.__module__.startswith("dspy.") and c.__name__ == "Example" for c in type(value).__mro__)


def _array_kind(np: Any, t: type) -> str | None:
    """The name of an ndarray class whose meaning is its dtype, shape and elements (and, for a
    masked array, its mask and fill value); ``None`` for any other subclass, which may carry more
    (a unit, an index) and is not keyed."""
    if t is np.ndarray:
        return "ndarray"
    if t is np.matrix or t is np.memmap or t is np.recarray:
        return str(t.__name__)
    ma = sys.modules.get("numpy.ma")
    if ma is not None and t is ma.MaskedArray:
        return "MaskedArray"
    return None


def _freeze_numpy(np: Any, value: Any, t: type, d: int) -> Any:
    """An array by its class, dtype (byte order and field names included), shape and elements; a
    masked array also by its mask and fill value; a numpy scalar by its dtype and bytes."""
    dtype = value.dtype
    if isinstance(value, np.generic):
        if dtype.hasobject:
            raise Unkeyable(f"numpy.{t.__name__}", "holds Python objects (dtype=object)")
        return ("numpy", t.__name__, dtype.str, str(dtype), value.tobytes())
    name = _array_kind(np, t)
    if name is None:
        raise Unkeyable(
            _qualname(t), "attributes beyond its elements that stageflow cannot key (an ndarray subclass)"
        )
    extra: tuple[Any, ...] = ()
    if name == "MaskedArray":
        mask = np.ma.getmaskarray(value)
        extra = (mask.tobytes(), freeze(value.fill_value, d))
        value = value.data
    if dtype.hasobject:  # the elements themselves, each keyed exactly (or refused)
        items = tuple(freeze(x, d) for x in np.asarray(value).ravel(order="C").tolist())
        return ("ndarray", name, "object", value.shape, items, *extra)
    return ("ndarray", name, dtype.str, str(dtype), value.shape, value.tobytes(), *extra)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return {"b": base64.b64encode(obj).decode("ascii")}
    if isinstance(obj, type):
        if "<locals>" in obj.__qualname__:
            raise NotDurable(_qualname(obj))
        return {"c": f"{obj.__module__}:{obj.__qualname__}"}
    if isinstance(obj, frozenset):
        return {"s": sorted(durable_text(v) for v in obj)}
    raise TypeError(type(obj).__name__)  # pragma: no cover - freeze() never produces anything else


def durable_text(frozen: Any) -> str:
    """Canonical JSON for a frozen key: equal across processes for equal keys.

    Raises:
        NotDurable: The key names a class that cannot be named stably (defined inside a function).
    """
    return json.dumps(frozen, default=_json_default, separators=(",", ":"))
