"""Parsing an LM answer with a plan: DSPy 3.4.1's ``ChatAdapter.parse`` / ``JSONAdapter.parse``,
step for step, with the signature's field tables and value parsers looked up once per signature."""

from __future__ import annotations

import re
from typing import Any

import json_repair
import regex  # type: ignore[import-untyped]
from dspy.utils.exceptions import AdapterParseError

from stageflow.lm.fast._plan import Plan

__all__ = ["complete_outputs", "parse_chat", "parse_json"]

_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")  # DSPy's chat_adapter.field_header_pattern
_JSON_OBJECT = regex.compile(r"\{(?:[^{}]|(?R))*\}", regex.DOTALL)


def complete_outputs(plan: Plan, fields: Any) -> dict[str, Any]:
    """DSPy's ``apply_output_field_defaults``: output fields in signature order, defaults filled in."""
    completed: dict[str, Any] = {}
    for spec in plan.outputs:
        name = spec.name
        if name in fields:
            completed[name] = fields[name]
        elif not spec.required:
            completed[name] = spec.info.get_default(call_default_factory=True)
        elif spec.allows_none:
            completed[name] = None
    return completed


def parse_chat(plan: Plan, signature: Any, completion: str) -> dict[str, Any]:
    """``ChatAdapter.parse``: ``[[ ## field ## ]]`` sections, first occurrence of each field wins."""
    sections: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in completion.splitlines():
        if "[[ ## " in line:  # the header pattern cannot match a line without it
            match = _HEADER.match(line.strip())
            if match:
                # DSPy slices the unstripped line at the stripped match's end; so do we.
                remaining = line[match.end() :].strip()
                sections.append((match.group(1), [remaining] if remaining else []))
                continue
        sections[-1][1].append(line)

    specs = plan.output_index
    fields: dict[str, Any] = {}
    for k, lines in sections:
        if k is None or k in fields or k not in specs:
            continue
        v = "\n".join(lines).strip()
        try:
            fields[k] = specs[k].parse(v)
        except ValueError as e:
            raise AdapterParseError(  # noqa: B904 (DSPy raises it without `from`; so do we)
                adapter_name="ChatAdapter",
                signature=signature,
                lm_response=completion,
                message=f"Failed to parse field {k} with value {v} from the LM response. Error message: {e}",
            )
    completed = complete_outputs(plan, fields)
    if len(completed) != len(plan.outputs):
        raise AdapterParseError(
            adapter_name="ChatAdapter", signature=signature, lm_response=completion, parsed_result=completed
        )
    return completed


def parse_json(plan: Plan, signature: Any, completion: str, adapter_name: str) -> dict[str, Any]:
    """``JSONAdapter.parse``: one JSON object (repaired, or found inside the text)."""
    fields = json_repair.loads(completion)
    if not isinstance(fields, dict):
        match = _JSON_OBJECT.search(completion)
        if match:
            completion = match.group(0)
            fields = json_repair.loads(completion)
    if not isinstance(fields, dict):
        raise AdapterParseError(
            adapter_name="JSONAdapter",
            signature=signature,
            lm_response=completion,
            message="LM response cannot be serialized to a JSON object.",
        )
    specs = plan.output_index
    fields = {k: v for k, v in fields.items() if k in specs}
    for k, v in fields.items():
        try:
            fields[k] = specs[k].parse(v)
        except ValueError as exc:
            raise AdapterParseError(
                adapter_name=adapter_name,
                signature=signature,
                lm_response=completion,
                message=f"Failed to parse field {k}: {exc}",
                parsed_result=fields,
            ) from exc
    completed = complete_outputs(plan, fields)
    if len(completed) != len(plan.outputs):
        raise AdapterParseError(
            adapter_name="JSONAdapter", signature=signature, lm_response=completion, parsed_result=completed
        )
    return completed
