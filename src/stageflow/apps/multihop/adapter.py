"""A terse JSON adapter for tiny local models.

DSPy's ``JSONAdapter`` writes a long system prompt: field descriptions, an input/output template with
``[[ ## field ## ]]`` markers and the JSON schema, then "In adhering to this structure, your objective
is: ...". Measured on SmolLM2-135M, the model parrots that template: sub-questions such as
``"]] }. The answer must be a JSON object..."``. With grammar-constrained decoding the output's shape
is enforced anyway, so :class:`CompactJSONAdapter` sends only what the model needs::

    system: <the signature's instructions>
            Reply in JSON with the key "sub_questions".
    user:   Question: In which town was the author of Hamlet born?

List inputs become ``- item`` lines; demos' answers are single-line JSON. Parsing, the response
schema and everything else are ``JSONAdapter``'s (this is a subclass).
"""

from __future__ import annotations

import json
from typing import Any

import dspy
from dspy.adapters.utils import serialize_for_json

__all__ = ["CompactJSONAdapter", "make_adapter"]


def _label(name: str) -> str:
    return name.replace("_", " ").capitalize()


def _value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "\n" + "\n".join(f"- {_value(v).strip()}" for v in value) if value else "(none)"
    if isinstance(value, str):
        return value
    return json.dumps(serialize_for_json(value), ensure_ascii=False)


class CompactJSONAdapter(dspy.JSONAdapter):  # type: ignore[misc]
    """``JSONAdapter`` with a two-line system prompt and ``Label: value`` inputs (see module docstring)."""

    def format_system_message(self, signature: Any) -> str:
        keys = ", ".join(f'"{name}"' for name in signature.output_fields)
        noun = "key" if len(signature.output_fields) == 1 else "keys"
        return f"{signature.instructions.strip()}\nReply in JSON with the {noun} {keys}."

    def format_user_message_content(
        self,
        signature: Any,
        inputs: dict[str, Any],
        prefix: str = "",
        suffix: str = "",
        main_request: bool = False,
    ) -> str:
        lines = [prefix] if prefix else []
        for name in signature.input_fields:
            if name in inputs:
                value = _value(inputs[name])
                sep = "" if value.startswith("\n") else " "
                lines.append(f"{_label(name)}:{sep}{value}")
        if suffix:
            lines.append(suffix)
        return "\n".join(lines).strip()

    def format_assistant_message_content(
        self, signature: Any, outputs: dict[str, Any], missing_field_message: str | None = None
    ) -> str:
        values = {name: outputs.get(name, missing_field_message) for name in signature.output_fields}
        return json.dumps(serialize_for_json(values), ensure_ascii=False)


def make_adapter(compact: bool) -> dspy.Adapter:
    """The adapter for the chosen prompt style: :class:`CompactJSONAdapter` or ``dspy.JSONAdapter``."""
    return CompactJSONAdapter() if compact else dspy.JSONAdapter()
