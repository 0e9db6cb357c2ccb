"""Type descriptions for :func:`stageflow.fingerprint` (internal): a signature field's type by its
definition, never by its name.

A signature whose output is a pydantic model must get a new fingerprint when the model gains a
field, even though the class is still called ``Ans``: the adapter asks the LM for a different JSON
shape and parses a different object. :func:`describe_type` spells a type out — a pydantic model
by its JSON schema (nested models, defaults, enums and descriptions included) and the code of
its validators, an enum by its members' names and values, a dataclass by its fields, a
``TypedDict`` / ``NamedTuple`` by its annotations, ``list[Ans] | None`` by its parts, ``Literal``
by its values. Descriptions of classes are remembered per class (weakly), a pydantic model's with
its validator: a model rebuilt in place with other fields (``model_rebuild(force=True)``) gets a new
validator and is described again; other classes are not edited in place in practice, and a new
definition (another run, a reload) is a new class.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import inspect
import json
import operator
import types
import typing
import weakref
from typing import Any

import pydantic

from stageflow._fp_code import code_digest

__all__ = ["describe_type", "models_in", "validator_of"]

_MAX_DEPTH = 12
#: class -> (the validators of the pydantic models it is or names, its description)
_CLASS_TEXT: weakref.WeakKeyDictionary[type, tuple[tuple[Any, ...], str]] = weakref.WeakKeyDictionary()


def validator_of(cls: Any) -> Any:
    """A pydantic model class's own validator (a new one after ``model_rebuild(force=True)``);
    ``None`` for other classes."""
    return cls.__dict__.get("__pydantic_validator__") if isinstance(cls, type) else None


def models_in(annotations: list[Any]) -> list[Any]:
    """The pydantic model classes ``annotations`` name (inside ``list[...]``, ``Optional``...).

    >>> import pydantic
    >>> class Person(pydantic.BaseModel):
    ...     name: str
    >>> [model.__name__ for model in models_in([list[Person], int | None])]
    ['Person']
    """
    found: list[Any] = []
    todo = list(annotations)
    seen = 0
    while todo and seen < 200:  # (bounded: an odd annotation cannot keep it walking)
        seen += 1
        annotation = todo.pop()
        if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
            if annotation not in found:
                found.append(annotation)
            continue
        inner = _named(annotation)
        if inner is not None:  # (a NewType, a type alias: the type it names)
            todo.append(inner)
            continue
        if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
            todo.extend(f.type for f in dataclasses.fields(annotation) if not isinstance(f.type, str))
            continue
        try:
            todo.extend(a for a in typing.get_args(annotation) if not isinstance(a, str))
        except Exception:  # (not a typing construct: nothing inside it)
            continue
    return found


def describe_type(tp: Any, depth: int = 0) -> str:
    """Stable text that changes whenever the definition of ``tp`` (a signature field type) changes.

    >>> import enum
    >>> class Color(enum.Enum):
    ...     RED = "red"
    >>> text = describe_type(Color)
    >>> "RED" in text and "'red'" in text
    True
    >>> describe_type(list[int] | None) == describe_type(list[str] | None)
    False
    """
    if depth > _MAX_DEPTH:
        return repr(tp)
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        # (described again when it, or a model its fields name, was rebuilt: a new validator)
        validators = tuple(validator_of(m) for m in models_in([tp]))
        known = _CLASS_TEXT.get(tp)
        if (
            known is not None
            and len(known[0]) == len(validators)
            and all(map(operator.is_, known[0], validators))
        ):
            return known[1]
        text = _describe_class(tp, depth)
        with contextlib.suppress(TypeError):  # a class that cannot be weakly referenced
            _CLASS_TEXT[tp] = (validators, text)
        return text
    inner = _named(tp)
    if inner is not None:  # a NewType or a type alias: by what it names, not only its name
        return repr(("named", getattr(tp, "__name__", repr(tp)), describe_type(inner, depth + 1)))
    origin = typing.get_origin(tp)
    if origin is None:
        return repr(tp)
    parts = [_describe_arg(a, depth + 1) for a in typing.get_args(tp)]
    name = origin.__qualname__ if isinstance(origin, type) else repr(origin)
    if isinstance(origin, type) and origin.__module__ not in ("builtins", "typing"):
        name = f"{origin.__module__}.{name}"
    return repr(("generic", name, parts))


def _named(tp: Any) -> Any:
    """The type a ``NewType`` or a type alias (``TypeAliasType``, ``type X = ...``) stands for;
    ``None`` for anything else."""
    if isinstance(tp, type):
        return None
    supertype = getattr(tp, "__supertype__", None)  # typing.NewType
    if supertype is not None:
        return supertype
    if type(tp).__name__ == "TypeAliasType":
        try:
            return tp.__value__
        except Exception:  # (an alias whose value cannot be evaluated: described by name)
            return None
    return None


def _describe_arg(a: Any, depth: int) -> Any:
    if isinstance(a, type) or typing.get_origin(a) is not None:
        return describe_type(a, depth)
    if isinstance(a, list):  # Callable[[int], str]'s argument list
        return [_describe_arg(x, depth) for x in a]
    return f"{type(a).__qualname__}:{a!r}"  # Literal values, ForwardRef, Ellipsis


def _describe_class(tp: type, depth: int) -> str:
    if tp.__module__ == "builtins":
        return tp.__qualname__
    name = f"{tp.__module__}.{tp.__qualname__}"
    if isinstance(getattr(tp, "model_fields", None), dict) and hasattr(tp, "model_json_schema"):
        return repr(("model", name, _schema(tp, depth), _validator_code(tp)))
    if issubclass(tp, enum.Enum):
        return repr(("enum", name, [(k, _stable(m.value)) for k, m in tp.__members__.items()]))
    if dataclasses.is_dataclass(tp):
        fields = [
            (
                f.name,
                describe_type(f.type, depth + 1),
                _stable(f.default),
                _stable(f.default_factory),
                f.kw_only,
            )
            for f in dataclasses.fields(tp)
        ]
        return repr(("dataclass", name, fields))
    annotations = inspect.get_annotations(tp)  # the class's own, not its bases'
    if annotations:  # TypedDict, NamedTuple, annotated classes
        return repr(("annotated", name, [(k, describe_type(v, depth + 1)) for k, v in annotations.items()]))
    return name


def _schema(tp: Any, depth: int) -> str:
    try:
        return json.dumps(tp.model_json_schema(), sort_keys=True, default=_stable)
    except Exception:  # a field type pydantic cannot put in a schema (arbitrary_types_allowed)
        return repr(
            [
                (k, describe_type(f.annotation, depth + 1), _stable(f.default), f.description)
                for k, f in tp.model_fields.items()
            ]
        )


_PLAIN = (str, int, float, bool, bytes, type(None))


def _stable(v: Any) -> str:
    """A default value as text that is the same in every process (no object addresses)."""
    if isinstance(v, _PLAIN):
        return repr(v)
    if isinstance(v, tuple | frozenset | list):
        items = [_stable(x) for x in v]
        return f"{type(v).__name__}[{', '.join(sorted(items) if isinstance(v, frozenset) else items)}]"
    if isinstance(v, enum.Enum):
        return f"{type(v).__qualname__}.{v.name}"
    if isinstance(v, types.FunctionType):
        return f"function:{code_digest(v.__code__)}"
    if v is dataclasses.MISSING:
        return "MISSING"
    if isinstance(v, type):
        return f"{v.__module__}.{v.__qualname__}"
    return f"<{type(v).__module__}.{type(v).__qualname__}>"


def _validator_code(tp: type) -> list[tuple[str, Any]]:
    """The code of the functions a model's own class body defines (validators, serializers,
    methods): what its schema does not show. Stable across processes (no addresses)."""
    out: list[tuple[str, Any]] = []
    for klass in tp.__mro__:
        if klass.__module__.startswith(("pydantic", "builtins")):
            continue
        for key, value in vars(klass).items():
            fn = getattr(value, "wrapped", value)  # pydantic's decorator proxy
            fn = getattr(fn, "__func__", fn)  # classmethod / staticmethod
            if isinstance(fn, types.FunctionType):
                out.append((f"{klass.__qualname__}.{key}", code_digest(fn.__code__)))
    return out
