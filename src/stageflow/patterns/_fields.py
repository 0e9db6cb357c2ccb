"""The fields of one stage's result, whatever shape the stage returned it in (internal)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stageflow.errors import PipelineError

__all__ = ["result_fields", "returned_fields"]


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


def returned_fields(value: Any, what: str, code: str = "bad_merge") -> dict[str, Any]:
    """The fields a method of yours returned (``what`` names it in the error): a dict, a
    ``dspy.Prediction`` or a pydantic model; anything else is a :class:`~stageflow.PipelineError`,
    never a bare value taken for ``content``.

    Examples:
        >>> returned_fields({"content": "x"}, "merge()")
        {'content': 'x'}
    """
    if isinstance(value, Mapping) or isinstance(getattr(value, "_store", None), dict):
        return result_fields(value)
    if isinstance(getattr(type(value), "model_fields", None), dict):
        return result_fields(value)
    raise PipelineError(
        f"{what} returned {type(value).__name__}: {value!r:.80}; it must return the fields as a dict (or a "
        "dspy.Prediction).",
        code=code,
        hint="return e.g. {'content': text}",
    )
