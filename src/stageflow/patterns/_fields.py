"""The fields of one stage's result, whatever shape the stage returned it in (internal)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["result_fields"]


def result_fields(item: Any) -> dict[str, Any]:
    """The fields of ``item``: a dict, a ``dspy.Prediction``, a pydantic model, or else the tutorial's
    convention of a bare value as its ``content``.

    Examples:
        >>> result_fields({"answer": "a"}), result_fields("just text")
        ({'answer': 'a'}, {'content': 'just text'})
    """
    if isinstance(item, Mapping):
        return dict(item)
    store = getattr(item, "_store", None)
    if isinstance(store, dict):
        return dict(store)
    model_fields = getattr(type(item), "model_fields", None)
    if isinstance(model_fields, dict):
        return {k: getattr(item, k) for k in model_fields}
    return {"content": str(item)}
