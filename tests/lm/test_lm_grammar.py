"""Unit tests for stageflow.lm.grammar: JSON schema -> GBNF with the measured fixes. No model needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Literal

import pydantic
import pytest

from stageflow.lm import grammar
from stageflow.lm.grammar import (
    FIXED_CHAR_CLASS,
    fix_char_rule,
    inline_refs,
    prepare_schema,
    schema_from_response_format,
    schema_to_gbnf,
    strip_annotations,
    tighten_schema,
)

needs_llama_cpp = pytest.mark.skipif(
    __import__("importlib").util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed"
)


class Inner(pydantic.BaseModel):
    name: str
    tags: list[str]


def dspy_schema() -> dict:
    """The schema DSPy's JSONAdapter sends (captured shape): $defs + $ref, titles, strict objects."""
    return {
        "$defs": {
            "Inner": {
                "properties": {
                    "name": {"title": "Name", "type": "string"},
                    "tags": {"items": {"type": "string"}, "title": "Tags", "type": "array"},
                },
                "required": ["name", "tags"],
                "title": "Inner",
                "type": "object",
                "additionalProperties": False,
            }
        },
        "additionalProperties": False,
        "properties": {
            "sub_questions": {"items": {"type": "string"}, "title": "Sub Questions", "type": "array"},
            "inner": {"$ref": "#/$defs/Inner"},
            "inners": {"items": {"$ref": "#/$defs/Inner"}, "title": "Inners", "type": "array"},
            "label": {"enum": ["a", "b"], "title": "Label", "type": "string"},
            "title": {"title": "Title", "type": "string"},
            "opt": {"anyOf": [{"type": "string"}, {"type": "null"}], "title": "Opt"},
        },
        "required": ["sub_questions", "inner", "inners", "label", "title", "opt"],
        "title": "DSPyProgramOutputs",
        "type": "object",
    }


# -- tighten_schema ---------------------------------------------------------------------------------


def test_tighten_bounds_strings_and_arrays_with_defaults():
    out = tighten_schema({"type": "array", "items": {"type": "string"}})
    assert out == {
        "type": "array",
        "items": {"type": "string", "minLength": 1, "maxLength": 200},
        "minItems": 1,
        "maxItems": 4,
    }


def test_tighten_custom_bounds_and_explicit_bounds_are_kept():
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "maxLength": 10},
            "b": {"type": "array", "items": {"type": "integer"}, "minItems": 0},
            "c": {"type": "string"},
        },
    }
    out = tighten_schema(schema, max_string_length=50, max_items=2)
    assert out["properties"]["a"] == {"type": "string", "maxLength": 10, "minLength": 1}
    assert out["properties"]["b"]["minItems"] == 0
    assert out["properties"]["b"]["maxItems"] == 2
    assert out["properties"]["c"]["maxLength"] == 50
    assert schema["properties"]["c"] == {"type": "string"}, "input must not be mutated"


def test_tighten_default_max_never_below_explicit_min():
    out = tighten_schema({"type": "array", "items": {"type": "string", "minLength": 300}, "minItems": 6})
    assert out["maxItems"] == 6
    assert out["items"]["maxLength"] == 300


@pytest.mark.parametrize(
    "string_schema",
    [
        {"type": "string", "enum": ["x", "y"]},
        {"type": "string", "const": "x"},
        {"type": "string", "pattern": "^[a-z]+$"},
        {"type": "string", "format": "date"},
    ],
)
def test_tighten_leaves_shaped_strings_alone(string_schema):
    assert tighten_schema(string_schema) == string_schema


def test_tighten_rejects_bad_bounds():
    with pytest.raises(ValueError):
        tighten_schema({}, max_items=0)
    with pytest.raises(ValueError):
        tighten_schema({}, max_string_length=0)


# -- $ref inlining and annotation stripping -------------------------------------------------------


def test_inline_refs_resolves_dspy_defs():
    out = inline_refs(dspy_schema())
    assert "$defs" not in out
    assert "$ref" not in json.dumps(out)
    inner = out["properties"]["inner"]
    assert inner["type"] == "object"
    assert list(inner["properties"]) == ["name", "tags"]
    assert out["properties"]["inners"]["items"]["properties"]["tags"]["type"] == "array"


def test_inline_refs_keeps_sibling_keywords():
    schema = {
        "$defs": {"X": {"type": "string"}},
        "type": "object",
        "properties": {"x": {"$ref": "#/$defs/X", "maxLength": 5}},
    }
    assert inline_refs(schema)["properties"]["x"] == {"type": "string", "maxLength": 5}


def test_inline_refs_keeps_recursive_refs_with_their_definition():
    schema = {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {
                    "v": {"type": "string"},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}},
                },
            }
        },
        "$ref": "#/$defs/Node",
    }
    out = inline_refs(schema)
    assert out["properties"]["kids"]["items"] == {"$ref": "#/$defs/Node"}
    assert out["$defs"]["Node"]["properties"]["kids"]["items"] == {"$ref": "#/$defs/Node"}


@pytest.mark.parametrize("ref", ["#/$defs/Missing", "https://example.com/schema.json", "other.json#/x"])
def test_inline_refs_rejects_unresolvable_refs(ref):
    with pytest.raises(ValueError):
        inline_refs({"type": "object", "properties": {"x": {"$ref": ref}}})


def test_strip_annotations_keeps_properties_named_like_keywords():
    out = strip_annotations(dspy_schema())
    assert "title" not in out
    assert "title" in out["properties"], "a field called 'title' is data, not an annotation"
    assert out["properties"]["title"] == {"type": "string"}
    assert "title" not in out["$defs"]["Inner"]


def test_prepare_schema_bounds_reach_inside_resolved_refs():
    out = prepare_schema(dspy_schema())
    inner = out["properties"]["inner"]
    assert inner["properties"]["name"] == {"type": "string", "minLength": 1, "maxLength": 200}
    assert inner["properties"]["tags"]["maxItems"] == 4
    assert out["properties"]["inners"]["items"]["properties"]["tags"]["items"]["minLength"] == 1
    assert out["properties"]["label"] == {"enum": ["a", "b"], "type": "string"}
    assert out["properties"]["opt"]["anyOf"][0] == {"type": "string", "minLength": 1, "maxLength": 200}
    assert list(out["properties"]) == list(dspy_schema()["properties"]), "field order is generation order"


# -- response_format shapes --------------------------------------------------------------------------


def test_schema_from_response_format_shapes():
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    assert schema_from_response_format(None) == (None, False)
    assert schema_from_response_format({"type": "text"}) == (None, False)
    assert schema_from_response_format({"type": "json_object"}) == (None, True)
    assert schema_from_response_format({"type": "json_object", "schema": schema}) == (schema, True)
    canonical = {"type": "json_schema", "schema": schema, "name": "DSPyProgramOutputs", "strict": True}
    assert schema_from_response_format(canonical) == (schema, True)
    openai = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    assert schema_from_response_format(openai) == (schema, True)
    from_model, json_mode = schema_from_response_format(Inner)
    assert json_mode
    assert set(from_model["properties"]) == {"name", "tags"}


@pytest.mark.parametrize("bad", [{"type": "json_schema"}, {"type": "xml"}, "json"])
def test_schema_from_response_format_rejects_unknown(bad):
    with pytest.raises(ValueError):
        schema_from_response_format(bad)


# -- the char rule fix -------------------------------------------------------------------------------


def test_fix_char_rule_patches_the_converter_rule():
    buggy = 'char ::= [^"\\\\] | "\\\\" (["\\\\/bfnrt])\nroot ::= "x"'
    fixed = fix_char_rule(buggy)
    assert fixed.splitlines()[0] == 'char ::= [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt])'
    assert fixed.splitlines()[0].startswith(f"char ::= {FIXED_CHAR_CLASS} ")
    assert fix_char_rule(fixed) == fixed, "idempotent"
    assert fix_char_rule('root ::= "x"') == 'root ::= "x"'


def test_fix_char_rule_refuses_an_unknown_char_rule():
    with pytest.raises(ValueError, match="unexpected char rule"):
        fix_char_rule("char ::= [a-z]")


@needs_llama_cpp
def test_schema_to_gbnf_has_fixed_char_rule_and_bounds():
    gbnf = schema_to_gbnf(dspy_schema())
    rules = dict(line.split(" ::= ", 1) for line in gbnf.splitlines())
    assert rules["char"].startswith(FIXED_CHAR_CLASS + " ")
    assert '[^"\\\\] ' not in gbnf
    # sub_questions: 1 required item + 3 optional ones, no unbounded repetition.
    assert rules["sub-questions"].count("sub-questions-item") == 4
    assert "*" not in rules["sub-questions"]
    # Strings are "\"" char (char ...)?  "\"": at least one char, at most 200.
    assert rules["title"].count("char") == 200
    assert rules["title"].startswith('"\\"" char (')
    # The $ref'd object is expanded with its own bounded fields.
    assert any(name.startswith("inner-name") for name in rules)
    # Field order is preserved (the model writes sub_questions first).
    assert rules["root"].index("sub-questions-kv") < rules["root"].index("inner-kv")


@needs_llama_cpp
def test_schema_to_gbnf_without_tightening_keeps_unbounded_strings():
    gbnf = schema_to_gbnf(
        {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}, tighten=False
    )
    assert "char*" in gbnf
    assert f"char ::= {FIXED_CHAR_CLASS}" in gbnf


@needs_llama_cpp
def test_json_object_grammar_is_fixed_too():
    gbnf = grammar.json_object_gbnf()
    assert "root ::= object" in gbnf
    assert f"char ::= {FIXED_CHAR_CLASS}" in gbnf


@needs_llama_cpp
def test_schema_to_gbnf_reports_unconvertible_schema():
    with pytest.raises(ValueError, match="cannot convert"):
        schema_to_gbnf({"type": "frobnicate"})


@needs_llama_cpp
def test_real_jsonadapter_schema_converts():
    """The schema JSONAdapter builds for a real signature converts cleanly."""
    import dspy
    from dspy.adapters.json_adapter import _get_structured_outputs_response_format

    class Sig(dspy.Signature):
        question: str = dspy.InputField()
        sub_questions: list[str] = dspy.OutputField()
        inner: Inner = dspy.OutputField()
        route: Literal["math", "chat"] = dspy.OutputField()
        answer: str = dspy.OutputField()

    model = _get_structured_outputs_response_format(Sig)
    schema, json_mode = schema_from_response_format(model)
    assert json_mode
    gbnf = schema_to_gbnf(schema)
    assert 'route ::= "\\"math\\"" | "\\"chat\\""' in gbnf
    assert f"char ::= {FIXED_CHAR_CLASS}" in gbnf


def test_importing_stageflow_lm_is_cheap():
    code = (
        "import sys, stageflow.lm, stageflow.lm.grammar;"
        "heavy = [m for m in ('llama_cpp', 'dspy', 'bm25s', 'numpy') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == ""
