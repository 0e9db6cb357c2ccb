"""Per-value work of the fast adapters: format one input value, parse one output value.

Both follow DSPy 3.4.1's ``dspy.adapters.utils.format_field_value`` and ``parse_value`` branch by
branch; the only difference is that the pydantic ``TypeAdapter`` each of them builds on every
call is built once per type (serialisation) or per annotation (parsing) and reused. Types that
could make a ``TypeAdapter`` depend on where it is built (forward references, types this module
does not know) never get here: :mod:`stageflow.lm.fast._plan` sends their signatures to DSPy.
"""

from __future__ import annotations

import ast
import enum
import json
import threading
import types
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

import json_repair
import pydantic
from dspy.adapters.utils import find_enum_member, format_field_value
from pydantic import TypeAdapter
from pydantic.fields import FieldInfo

from stageflow._fp_types import models_in, validator_of

__all__ = ["ValueParser", "format_value", "type_adapter"]

_SIMPLE_VALUE_TYPES = frozenset({int, float, bool, type(None), list, dict, tuple})
_MAX_CACHED = 1024
_LOCK = threading.Lock()
# type -> TypeAdapter, or None for "let DSPy format values of this type"
_SERIALIZERS: dict[Any, TypeAdapter[Any] | None] = {}
# (annotation, its spelling) -> TypeAdapter, for parsing. Not the annotation alone: annotations that
# compare equal can validate differently (``Union[int, bool]`` == ``Union[bool, int]``, but pydantic
# tries the members in order, so "1.0" is 1 for one and True for the other).
_VALIDATORS: dict[Any, TypeAdapter[Any]] = {}


def _serializer(t: type) -> TypeAdapter[Any] | None:
    # (a model's adapter is kept with the validator it was built from: a rebuilt model gets a new one)
    key: Any = t if t in _SIMPLE_VALUE_TYPES else (t, validator_of(t))
    try:
        return _SERIALIZERS[key]
    except KeyError:
        pass
    ta: TypeAdapter[Any] | None = None
    if t in _SIMPLE_VALUE_TYPES or _is_plain_model(t):
        try:
            ta = TypeAdapter(t)
        except Exception:
            ta = None
    with _LOCK:
        if len(_SERIALIZERS) >= _MAX_CACHED:
            _SERIALIZERS.clear()
        _SERIALIZERS[key] = ta
    return ta


def _is_plain_model(t: type) -> bool:
    """A complete pydantic model that is not one of DSPy's custom types (Image, History...)."""
    from dspy.adapters.types.base_type import Type as DspyType

    try:
        return (
            issubclass(t, pydantic.BaseModel)
            and not issubclass(t, DspyType)
            and bool(getattr(t, "__pydantic_complete__", False))
        )
    except TypeError:
        return False


def format_value(info: FieldInfo, annotation: Any, value: Any) -> str:
    """The text DSPy's ``format_field_value(info, value)`` gives, without a TypeAdapter per call.

    >>> from pydantic.fields import FieldInfo
    >>> format_value(FieldInfo(annotation=str), str, "plain text")
    'plain text'
    >>> format_value(FieldInfo(annotation=list[int]), list[int], [1, 2])
    '[1, 2]'
    """
    t = type(value)
    if t is str:
        return value  # type: ignore[no-any-return]
    if isinstance(value, list) and annotation is str:
        return format_field_value(info, value)  # type: ignore[no-any-return]  # numbered list, no TypeAdapter
    ta = _serializer(t)
    if ta is None:
        return format_field_value(info, value)  # type: ignore[no-any-return]
    try:
        jsonable = ta.dump_python(value, mode="json", fallback=str)
    except Exception:
        jsonable = str(value)
    if isinstance(jsonable, dict | list):
        return json.dumps(jsonable, ensure_ascii=False)
    return str(jsonable)


def type_adapter(annotation: Any) -> TypeAdapter[Any]:
    """One shared ``TypeAdapter`` per (hashable) annotation, told apart by its exact spelling.

    >>> from typing import Union
    >>> first, second = type_adapter(Union[int, bool]), type_adapter(Union[bool, int])
    >>> first.validate_python(1.0), second.validate_python(1.0)
    (1, True)
    """
    try:
        key = (annotation, repr(annotation), tuple(map(validator_of, models_in([annotation]))))
        return _VALIDATORS[key]
    except KeyError:
        pass
    except TypeError:  # an unhashable annotation (Annotated with unhashable metadata)
        return TypeAdapter(annotation)
    ta: TypeAdapter[Any] = TypeAdapter(annotation)
    with _LOCK:
        if len(_VALIDATORS) >= _MAX_CACHED:
            _VALIDATORS.clear()
        _VALIDATORS[key] = ta
    return ta


def _as_str(parser: ValueParser, value: Any) -> str:
    return str(value)


class ValueParser:
    """Parse one output value like DSPy's ``parse_value(value, annotation)`` (3.4.1).

    The branch to take is decided once per annotation instead of on every call.

    >>> ValueParser(int)("42")
    42
    >>> ValueParser(Literal["yes", "no"])("'yes'")
    'yes'
    """

    __slots__ = ("_annotation", "_call", "_ta")

    def __init__(self, annotation: Any) -> None:
        self._annotation = annotation
        self._ta: TypeAdapter[Any] | None = None
        # (the class's function, not a bound method: one on the instance would keep it in a
        # reference cycle, and a dropped plan's parsers alive until a collection)
        self._call: Callable[[ValueParser, Any], Any]
        origin = get_origin(annotation)
        if annotation is str:
            self._call = _as_str
        elif isinstance(annotation, enum.EnumMeta):
            self._call = ValueParser._enum
        elif origin is Literal:
            self._call = ValueParser._literal
        elif (
            origin in (Union, types.UnionType)
            and type(None) in get_args(annotation)
            and str in get_args(annotation)
        ):
            self._call = ValueParser._validate_any
        else:
            self._call = ValueParser._general

    def __call__(self, value: Any) -> Any:
        return self._call(self, value)

    def _enum(self, value: Any) -> Any:
        return find_enum_member(self._annotation, value)

    def _literal(self, value: Any) -> Any:
        allowed = get_args(self._annotation)
        if value in allowed:
            return value
        if isinstance(value, str):
            v = value.strip()
            if v.startswith(("Literal[", "str[")) and v.endswith("]"):
                v = v[v.find("[") + 1 : -1]
            if len(v) > 1 and v[0] == v[-1] and v[0] in "\"'":
                v = v[1:-1]
            if v in allowed:
                return v
            value = v
        return self._general(value)

    def _adapter(self) -> TypeAdapter[Any]:
        ta = self._ta
        if ta is None:
            ta = self._ta = type_adapter(self._annotation)
        return ta

    def _validate_any(self, value: Any) -> Any:
        return self._adapter().validate_python(value)

    def _general(self, value: Any) -> Any:
        ta = self._adapter()
        if not isinstance(value, str):
            return ta.validate_python(value)
        candidate = json_repair.loads(value)  # "" on failure
        if candidate == "" and value != "":
            try:
                candidate = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                candidate = value
        return ta.validate_python(candidate)
