r"""JSON schema → llama.cpp GBNF grammar, tuned for small models.

DSPy's ``JSONAdapter`` sends the signature's output schema as
``{"type": "json_schema", "schema": {...}}``. llama-cpp-python silently ignores that shape, so the
engine turns the schema into a GBNF grammar and passes it as ``grammar=``. The conversion uses
llama-cpp-python's own converter with two measured fixes:

* Its ``char`` rule (``[^"\\]``) lets raw newlines and other control characters into JSON strings,
  so ``json.loads`` fails and the string often never closes. Upstream llama.cpp excludes them:
  ``[^"\\\x7F\x00-\x1F]``. :func:`fix_char_rule` applies that.
* Left unbounded, a small model emits ``""`` / ``[]`` or runs a value until ``max_tokens``.
  :func:`tighten_schema` bounds every free-text string (1..200 characters by default) and every
  array (1..4 items by default) that does not bound itself.

Schemas are prepared by :func:`prepare_schema`: local ``$ref`` pointers (``#/$defs/...``, as pydantic
and DSPy emit them) are inlined so each use gets its own bounds, annotation-only keywords are dropped,
then bounds are applied. Everything here is a pure function; only :func:`schema_to_gbnf` imports
``llama_cpp`` (for its converter, which is pure Python).
"""

from __future__ import annotations

import copy
import functools
import json
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "DEFAULT_MAX_ITEMS",
    "DEFAULT_MAX_STRING_LENGTH",
    "FIXED_CHAR_CLASS",
    "fix_char_rule",
    "inline_refs",
    "json_object_gbnf",
    "prepare_schema",
    "schema_from_response_format",
    "schema_to_gbnf",
    "strip_annotations",
    "tighten_schema",
]

DEFAULT_MAX_STRING_LENGTH = 200
DEFAULT_MAX_ITEMS = 4

# The character class upstream llama.cpp uses for a JSON string character (GBNF text).
FIXED_CHAR_CLASS = r'[^"\\\x7F\x00-\x1F]'
_BUGGY_CHAR_PREFIX = r'char ::= [^"\\] '
_FIXED_CHAR_PREFIX = f"char ::= {FIXED_CHAR_CLASS} "

# Keywords whose value is a map of name -> subschema (property names are data, never keywords).
_SCHEMA_MAP_KEYWORDS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
# Keywords whose value is one subschema.
_SCHEMA_KEYWORDS = (
    "items",
    "additionalProperties",
    "additionalItems",
    "unevaluatedItems",
    "unevaluatedProperties",
    "contains",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
)
# Keywords whose value is a list of subschemas.
_SCHEMA_LIST_KEYWORDS = ("anyOf", "oneOf", "allOf", "prefixItems")
# Keywords that only annotate; the grammar converter ignores them, so they are noise.
_ANNOTATION_KEYWORDS = frozenset(
    {"title", "description", "default", "examples", "$comment", "deprecated", "readOnly", "writeOnly"}
)
# A string carrying one of these is already constrained (or has its own grammar rule): no length bounds.
_STRING_SHAPE_KEYWORDS = ("enum", "const", "pattern", "format")

JsonSchema = dict[str, Any]


def _map_subschemas(schema: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply ``fn`` to every direct subschema of ``schema`` (keyword-aware), returning a new dict."""
    if not isinstance(schema, dict):
        return schema
    out: JsonSchema = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAP_KEYWORDS and isinstance(value, dict):
            out[key] = {name: fn(sub) for name, sub in value.items()}
        elif key in _SCHEMA_KEYWORDS and isinstance(value, dict):
            out[key] = fn(value)
        elif (key in _SCHEMA_LIST_KEYWORDS or key == "items") and isinstance(value, list):
            out[key] = [fn(sub) for sub in value]  # ("items" as a list: the draft-04 tuple form)
        else:
            out[key] = copy.deepcopy(value)
    return out


def strip_annotations(schema: Any) -> Any:
    """Drop annotation-only keywords (``title``, ``description``, ``default``, ...) at every level.

    Property *names* are never touched: a field called ``title`` keeps its place in ``properties``.
    """
    if not isinstance(schema, dict):
        return schema
    kept = {k: v for k, v in schema.items() if k not in _ANNOTATION_KEYWORDS}
    return _map_subschemas(kept, strip_annotations)


def _resolve_pointer(root: Mapping[str, Any], ref: str) -> Any:
    if not ref.startswith("#"):
        raise ValueError(f"only local $ref pointers ('#/...') are supported, got {ref!r}")
    node: Any = root
    for raw in ref[1:].split("/")[1:] if ref != "#" else []:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise ValueError(f"$ref {ref!r} does not resolve inside the schema")
    return node


def inline_refs(schema: JsonSchema) -> JsonSchema:
    """Replace local ``$ref`` pointers with the schema they point to.

    Keywords next to a ``$ref`` (pydantic adds e.g. ``description``) are kept and win over the
    target's. A recursive reference cannot be inlined: it stays a ``$ref`` and its definition is kept
    under ``$defs``/``definitions``; every other definition is dropped once inlined.
    """
    if not isinstance(schema, dict):
        raise TypeError(f"a JSON schema must be a dict, got {type(schema).__name__}")
    kept_refs: dict[str, JsonSchema] = {}

    def visit(node: Any, active: tuple[str, ...]) -> Any:
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str):
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            if ref in active:  # recursion: keep the pointer, keep its definition
                if ref not in kept_refs:
                    kept_refs[ref] = {}  # placeholder; filled below
                    kept_refs[ref] = visit(_resolve_pointer(schema, ref), (ref,))
                return {"$ref": ref, **_map_subschemas(siblings, lambda s: visit(s, active))}
            target = visit(_resolve_pointer(schema, ref), (*active, ref))
            merged = dict(target) if isinstance(target, dict) else {}
            merged.update(_map_subschemas(siblings, lambda s: visit(s, active)))
            return merged
        body = {k: v for k, v in node.items() if k not in ("$defs", "definitions")}
        return _map_subschemas(body, lambda s: visit(s, active))

    result: JsonSchema = visit(schema, ())
    for ref, definition in kept_refs.items():
        parts = ref[2:].split("/") if ref.startswith("#/") else []
        if len(parts) != 2 or parts[0] not in ("$defs", "definitions"):
            raise ValueError(f"recursive $ref {ref!r} must point into $defs or definitions")
        result.setdefault(parts[0], {})[parts[1].replace("~1", "/").replace("~0", "~")] = definition
    return result


def tighten_schema(
    schema: Any,
    *,
    max_string_length: int = DEFAULT_MAX_STRING_LENGTH,
    max_items: int = DEFAULT_MAX_ITEMS,
    min_string_length: int = 1,
    min_items: int = 1,
) -> Any:
    """Bound every free-text string and every homogeneous array that does not bound itself.

    Strings with ``enum``/``const``/``pattern``/``format`` are left alone. Existing bounds are kept;
    a default maximum never drops below an explicit minimum.
    """
    if min_string_length < 0 or max_string_length < max(1, min_string_length):
        raise ValueError("need 0 <= min_string_length <= max_string_length and max_string_length >= 1")
    if min_items < 0 or max_items < max(1, min_items):
        raise ValueError("need 0 <= min_items <= max_items and max_items >= 1")

    def visit(node: Any) -> Any:
        if not isinstance(node, dict):
            return node
        out: JsonSchema = _map_subschemas(node, visit)
        kind = out.get("type")
        if kind == "string" and not any(k in out for k in _STRING_SHAPE_KEYWORDS):
            low = out.setdefault("minLength", min_string_length)
            out.setdefault("maxLength", max(max_string_length, low))
        elif kind == "array" and isinstance(out.get("items"), dict) and "prefixItems" not in out:
            low = out.setdefault("minItems", min_items)
            out.setdefault("maxItems", max(max_items, low))
        return out

    return visit(schema)


def prepare_schema(
    schema: JsonSchema,
    *,
    max_string_length: int = DEFAULT_MAX_STRING_LENGTH,
    max_items: int = DEFAULT_MAX_ITEMS,
    min_string_length: int = 1,
    min_items: int = 1,
) -> JsonSchema:
    """Inline ``$ref`` pointers, drop annotations, then apply :func:`tighten_schema` bounds."""
    prepared: JsonSchema = tighten_schema(
        strip_annotations(inline_refs(schema)),
        max_string_length=max_string_length,
        max_items=max_items,
        min_string_length=min_string_length,
        min_items=min_items,
    )
    return prepared


def fix_char_rule(gbnf: str) -> str:
    """Make the converter's JSON string ``char`` rule exclude control characters (upstream's class).

    Raises:
        ValueError: the grammar has a ``char`` rule of an unknown shape (a converter change that
            this fix must be re-checked against).
    """
    lines = gbnf.split("\n")
    for i, line in enumerate(lines):
        if not line.startswith("char ::= "):
            continue
        if line.startswith(_BUGGY_CHAR_PREFIX):
            lines[i] = _FIXED_CHAR_PREFIX + line[len(_BUGGY_CHAR_PREFIX) :]
        elif not line.startswith(_FIXED_CHAR_PREFIX):
            raise ValueError(f"unexpected char rule from the GBNF converter: {line!r}")
    return "\n".join(lines)


@functools.lru_cache(maxsize=256)
def _convert(canonical_schema: str) -> str:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf: str = json_schema_to_gbnf(canonical_schema)
    except (AssertionError, KeyError, ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"cannot convert this JSON schema to a grammar: {exc}") from exc
    return fix_char_rule(gbnf)


def schema_to_gbnf(
    schema: JsonSchema,
    *,
    max_string_length: int = DEFAULT_MAX_STRING_LENGTH,
    max_items: int = DEFAULT_MAX_ITEMS,
    min_string_length: int = 1,
    min_items: int = 1,
    tighten: bool = True,
) -> str:
    """Convert a JSON schema to a GBNF grammar that llama.cpp enforces while decoding.

    Args:
        schema: The JSON schema, e.g. ``request.config.response_format["schema"]`` from DSPy.
        max_string_length, max_items, min_string_length, min_items: Bounds for
            :func:`tighten_schema`.
        tighten: ``False`` keeps the schema's own bounds only (``$ref`` inlining and the ``char``
            fix still apply).

    Raises:
        ValueError: the schema cannot be expressed as a grammar.
    """
    if tighten:
        prepared = prepare_schema(
            schema,
            max_string_length=max_string_length,
            max_items=max_items,
            min_string_length=min_string_length,
            min_items=min_items,
        )
    else:
        prepared = strip_annotations(inline_refs(schema))
    # Canonical text (key order kept: it is the order the model writes the fields in).
    return _convert(json.dumps(prepared, ensure_ascii=False, separators=(",", ":")))


def json_object_gbnf() -> str:
    """Grammar for "any JSON object" (DSPy's ``{"type": "json_object"}`` mode)."""
    return _convert(json.dumps({"type": "object"}))


def schema_from_response_format(response_format: Any) -> tuple[JsonSchema | None, bool]:
    """Read ``(schema, json_mode)`` from any spelling of ``response_format``.

    Accepts the canonical lm15 form ``{"type": "json_schema", "schema": S}``, the OpenAI form
    ``{"type": "json_schema", "json_schema": {"schema": S}}``, ``{"type": "json_object"}`` (with an
    optional ``"schema"``, llama-cpp-python's own spelling), ``{"type": "text"}``/``None`` and a
    pydantic model class (the legacy ``BaseLM.forward`` route).

    Raises:
        ValueError: an unknown ``type`` or a ``json_schema`` without a schema.
    """
    if response_format is None:
        return None, False
    schema_method = getattr(response_format, "model_json_schema", None)
    if isinstance(response_format, type) and callable(schema_method):
        produced = schema_method()
        if not isinstance(produced, dict):
            raise ValueError("model_json_schema() did not return a dict")
        return produced, True
    if not isinstance(response_format, Mapping):
        raise ValueError(f"unsupported response_format: {response_format!r}")
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None, False
    if kind == "json_object":
        schema = response_format.get("schema")
        return (dict(schema) if isinstance(schema, Mapping) else None), True
    if kind == "json_schema":
        schema = response_format.get("schema")
        if schema is None and isinstance(response_format.get("json_schema"), Mapping):
            schema = response_format["json_schema"].get("schema")
        if not isinstance(schema, Mapping):
            raise ValueError("response_format of type 'json_schema' carries no schema")
        return dict(schema), True
    raise ValueError(f"unsupported response_format type {kind!r}")
