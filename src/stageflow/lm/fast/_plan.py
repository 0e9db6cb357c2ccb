"""What the fast adapters know about one signature: its plan, built once and checked every call.

A :class:`Plan` holds everything that depends only on the signature (field tables, value
parsers, and, filled in by the adapter on first use, the system message, the output-format
reminder and formatted demo blocks). Plans live in a ``WeakKeyDictionary`` keyed by the
signature class itself, never by ``id()``: a plan dies with its signature, and a new signature
(``with_instructions``, ``with_updated_fields``...) is a new key. A signature changed in place
(``signature.instructions = ...``, a field's description or type edited) no longer matches its
plan's snapshot and gets a fresh plan on the next call.

A signature the fast path does not cover (DSPy custom types such as images, history or tools;
types it cannot build a ``TypeAdapter`` for exactly as DSPy would) gets a plan whose ``reason``
says why; the adapters then run DSPy's own code for it.
"""

from __future__ import annotations

import enum
import types
import typing
import weakref
from typing import Any, ForwardRef, Literal, NamedTuple, Union, get_args, get_origin

import pydantic
from pydantic.fields import FieldInfo

from stageflow._fp_types import models_in, validator_of
from stageflow.lm.fast._values import ValueParser

__all__ = ["OutputSpec", "Plan", "plan_for"]

_MAX_DEMO_BLOCKS = 64
_LEAF_TYPES = frozenset({str, int, float, bool, type(None), list, dict, tuple, set, frozenset})
_CONTAINER_ORIGINS = frozenset({list, dict, tuple, set, frozenset, Union, types.UnionType})


class OutputSpec(NamedTuple):
    """One output field, as parsing needs it."""

    name: str
    info: FieldInfo
    required: bool
    allows_none: bool
    parse: ValueParser


class InputSpec(NamedTuple):
    """One input field, as formatting needs it."""

    name: str
    info: FieldInfo
    annotation: Any
    header: str


def _unsupported(annotation: Any) -> str | None:
    """Why a type annotation is outside the fast path (``None``: inside)."""
    from dspy.adapters.types.base_type import Type as DspyType
    from dspy.adapters.types.history import History
    from dspy.adapters.types.tool import ToolCallResults

    if annotation is Any or annotation in _LEAF_TYPES:
        return None
    if isinstance(annotation, str | ForwardRef):
        return f"unresolved type annotation {annotation!r}"
    if isinstance(annotation, type):
        if issubclass(annotation, DspyType | History | ToolCallResults):
            return f"DSPy custom type {annotation.__name__} (images, audio, history, tools...)"
        if issubclass(annotation, enum.Enum):
            return None
        if issubclass(annotation, pydantic.BaseModel):
            if not getattr(annotation, "__pydantic_complete__", False):
                return f"pydantic model {annotation.__name__} is not fully defined"
            return None
        if get_origin(annotation) is None:
            return f"type {annotation.__qualname__} is not covered by the fast path"
    origin = get_origin(annotation)
    if origin is Literal:
        return None
    if origin is typing.Annotated:
        return _unsupported(get_args(annotation)[0])
    if origin in _CONTAINER_ORIGINS:
        for arg in get_args(annotation):
            if arg is Ellipsis:
                continue
            why = _unsupported(arg)
            if why is not None:
                return why
        return None
    return f"type {annotation!r} is not covered by the fast path"


def _allows_none(annotation: Any) -> bool:
    from dspy.adapters.utils import annotation_allows_none

    return bool(annotation_allows_none(annotation))


class Plan:
    """Everything about one signature that does not change from call to call.

    Attributes:
        reason: Why DSPy's own adapter code must handle this signature, or ``None``.
        inputs / outputs: Field tables in signature order (``output_index``: outputs by name).
        names: All field names (inputs, then outputs), the key order of a demo's cache key.
        open_mapping: An output field is a ``dict[...]`` (JSON mode instead of a schema).
        system: The system message (set by the adapter on first use).
        output_reminder: The output-format reminder of the user message (set on first use).
        demo_blocks: Formatted demo messages by demo content key.
        format_verified / parse_verified: The first fast format / parse was compared with DSPy's.
        differs: What differed in such a comparison (every call then goes to DSPy's code).
    """

    __slots__ = (
        "__weakref__",
        "_doc",
        "_fields",
        "_items",
        "_models",
        "_nfields",
        "_snapshot",
        "checked_with",
        "decisions",
        "demo_blocks",
        "differs",
        "format_verified",
        "inputs",
        "names",
        "open_mapping",
        "output_index",
        "output_reminder",
        "outputs",
        "parse_verified",
        "reason",
        "response_models",
        "system",
    )

    def __init__(self, signature: Any) -> None:
        self._doc = signature.__doc__
        fields: dict[str, FieldInfo] = signature.__pydantic_fields__
        self._fields = fields
        self._nfields = len(fields)
        #: The fields as ``(name, field)`` pairs: one replaced in the signature's fields dict, or a
        #: key renamed, is another field (the pairs compare by identity first, in C).
        self._items = tuple(fields.items())
        self._snapshot: tuple[tuple[Any, ...], ...] = tuple(
            (fi, fi.annotation, fi.json_schema_extra, fi.default, *_extras(fi.json_schema_extra))
            for fi in fields.values()
        )
        #: The pydantic models the fields' types name, with their validators: a model rebuilt with
        #: other fields (``model_rebuild(force=True)``) gets a new validator and makes the plan stale.
        self._models = tuple(
            (m, validator_of(m)) for m in models_in([fi.annotation for fi in fields.values()])
        )
        self.system: str | None = None
        self.output_reminder: Any = _UNSET
        self.demo_blocks: dict[Any, tuple[tuple[str, str], ...]] = {}
        #: Per native-function-calling switch: (what the schema was made of, the model or False).
        self.response_models: dict[bool, tuple[tuple[str, ...], Any]] = {}
        #: Whether DSPy's ``resolve_adapter`` acts on the signature (filled by the stage path).
        self.decisions: bool | None = None
        #: (an adapter's plan) the LM-stage path's plan of the signature it was last found to match
        #: beside: while that one still matches, so does this one (see FastChatAdapter.__call__)
        self.checked_with: Plan | None = None
        self.format_verified = False
        self.parse_verified = False
        self.differs: str | None = None
        self.reason: str | None = None
        self.inputs: tuple[InputSpec, ...] = ()
        self.outputs: tuple[OutputSpec, ...] = ()
        self.output_index: dict[str, OutputSpec] = {}
        self.names: tuple[str, ...] = ()
        self.open_mapping = False
        try:
            self._analyse(fields)
        except Exception as e:  # an odd signature: DSPy's code decides what it means
            self.reason = f"signature could not be analysed ({type(e).__name__}: {e})"

    def _analyse(self, fields: dict[str, FieldInfo]) -> None:
        inputs, outputs = [], []
        for name, fi in fields.items():
            extra = fi.json_schema_extra
            kind = extra.get("__dspy_field_type") if isinstance(extra, dict) else None
            if kind not in ("input", "output"):
                self.reason = f"field '{name}' is neither an InputField nor an OutputField"
                return
            why = _unsupported(fi.annotation)
            if why is not None:
                self.reason = f"field '{name}': {why}"
                return
            if kind == "input":
                inputs.append(InputSpec(name, fi, fi.annotation, f"[[ ## {name} ## ]]\n"))
            else:
                outputs.append(
                    OutputSpec(
                        name, fi, fi.is_required(), _allows_none(fi.annotation), ValueParser(fi.annotation)
                    )
                )
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.output_index = {s.name: s for s in outputs}
        self.names = tuple(s.name for s in inputs) + tuple(s.name for s in outputs)
        self.open_mapping = any(get_origin(s.info.annotation) is dict for s in outputs)

    def matches(self, signature: Any) -> bool:
        """Whether ``signature`` still looks as it did when this plan was built."""
        if signature.__doc__ is not self._doc:
            return False
        fields = signature.__pydantic_fields__
        if fields is not self._fields or len(fields) != self._nfields:
            return False
        if tuple(fields.items()) != self._items:
            return False
        try:
            for fi, annotation, extra, default, desc, constraints, kind in self._snapshot:
                if (
                    fi.annotation is not annotation
                    or fi.json_schema_extra is not extra
                    or fi.default is not default  # (an output default decides whether it is required)
                    or extra.get("desc") is not desc
                    or extra.get("constraints") is not constraints
                    or extra.get("__dspy_field_type") is not kind
                ):
                    return False  # identity, not equality: an equal replacement just rebuilds the plan
        except AttributeError:  # json_schema_extra is not a dict
            return False
        for model, validator in self._models:
            if model.__dict__.get("__pydantic_validator__") is not validator:  # (validator_of, inline)
                return False
        return True

    def remember_demos(self, key: Any, block: tuple[tuple[str, str], ...]) -> None:
        blocks = self.demo_blocks
        if len(blocks) >= _MAX_DEMO_BLOCKS:
            blocks.clear()  # optimizers try many demo sets; keep the memory bounded
        blocks[key] = block


_UNSET: Any = object()


def _extras(extra: Any) -> tuple[Any, Any, Any]:
    if not isinstance(extra, dict):
        return (None, None, None)
    return (extra.get("desc"), extra.get("constraints"), extra.get("__dspy_field_type"))


def plan_for(plans: weakref.WeakKeyDictionary[Any, Plan], signature: Any) -> Plan | None:
    """The current plan of ``signature`` in ``plans`` (built when missing or stale).

    ``None`` when ``signature`` is not a DSPy signature class the plans can be keyed by.
    """
    try:
        plan = plans.get(signature)
    except TypeError:
        return None
    if plan is not None and plan.matches(signature):
        return plan
    if not hasattr(signature, "__pydantic_fields__"):
        return None
    plan = Plan(signature)
    plans[signature] = plan
    return plan
