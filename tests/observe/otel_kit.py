"""Reading the spans an in-memory exporter collected: by stage path, with their parents."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["is_lm_span", "is_run_span", "parent_of", "stage_spans"]


def is_run_span(span: Any) -> bool:
    return span.attributes.get("gen_ai.operation.name") == "invoke_workflow"


def is_lm_span(span: Any) -> bool:
    """One of stageflow's LM-call spans (they name the stage they ran in; stage spans have a type)."""
    attrs = span.attributes
    return (
        attrs.get("openinference.span.kind") == "LLM"
        and "stageflow.stage.path" in attrs
        and "stageflow.stage.type" not in attrs
    )


def stage_spans(spans: Sequence[Any]) -> dict[str, Any]:
    """Stage spans by stage path (each path once in the tests that use this)."""
    out: dict[str, Any] = {}
    for s in spans:
        if "stageflow.stage.type" in s.attributes:
            path = s.attributes["stageflow.stage.path"]
            assert path not in out, f"two spans for {path}"
            out[path] = s
    return out


def parent_of(span: Any, spans: Sequence[Any]) -> Any:
    """The span's parent among ``spans`` (``None`` for a root)."""
    if span.parent is None:
        return None
    for s in spans:
        if s.context.span_id == span.parent.span_id:
            return s
    raise AssertionError(f"parent of {span.name} is not among the exported spans")
