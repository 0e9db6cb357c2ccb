"""The fields of one stage's result, whatever shape the stage returned it in (internal)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import dspy

from stageflow.errors import PipelineError

__all__ = ["Produced", "call_yours", "result_fields", "returned_fields"]


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


class Produced(dspy.Prediction):  # type: ignore[misc]
    """A stage's result as a merger or aggregator of yours gets it: a ``dspy.Prediction`` of the
    fields the stage wrote (a copy: what you change in it stays in it), which also has the
    tutorial's ``.predictions`` (the fields as a dict).

    Examples:
        >>> r = Produced(content="Paris")
        >>> r.content, r["content"], r.predictions
        ('Paris', 'Paris', {'content': 'Paris'})
    """

    @property
    def predictions(self) -> dict[str, Any]:
        return dict(self._store)


def returned_fields(value: Any, what: str, code: str = "bad_merge") -> dict[str, Any]:
    """The fields a method of yours returned (``what`` names it in the error): a dict with string
    keys, a ``dspy.Prediction`` or a pydantic model; anything else is a
    :class:`~stageflow.PipelineError`, never a bare value taken for ``content``.

    Examples:
        >>> returned_fields({"content": "x"}, "merge()")
        {'content': 'x'}
    """
    if (
        isinstance(value, Mapping)
        or isinstance(getattr(value, "_store", None), dict)
        or isinstance(getattr(type(value), "model_fields", None), dict)
    ):
        fields = result_fields(value)
        odd = [k for k in fields if not isinstance(k, str)]
        if not odd:
            return fields
        raise PipelineError(
            f"{what} returned a field named {odd[0]!r} ({type(odd[0]).__name__}); field names are strings.",
            code=code,
            hint="return e.g. {'content': text}",
        )
    raise PipelineError(
        f"{what} returned {type(value).__name__}: {value!r:.80}; it must return the fields as a dict (or a "
        "dspy.Prediction).",
        code=code,
        hint="return e.g. {'content': text}",
    )


def call_yours(method: Any, arg: Any, what: str, code: str) -> Any:
    """``method(arg)`` — a merge or aggregate method of yours — with what it raises named: any
    ``Exception`` (a ``PipelineError`` of yours too, as the tutorial's merger raises) becomes a
    :class:`~stageflow.PipelineError` naming ``what``, the error as its ``__cause__``; interrupts
    pass as they are."""
    try:
        return method(arg)
    except Exception as e:
        raise PipelineError(f"{what} raised {type(e).__name__}: {e}", code=code) from e
