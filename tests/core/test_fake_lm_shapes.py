"""FakeLM answers every output field with a value its type parses from, optional fields included."""

from __future__ import annotations

from typing import Literal, Optional

import dspy
import pytest

from stageflow.testing import FakeLM


class Optionals(dspy.Signature):
    """Answer."""

    q: str = dspy.InputField()
    a: Optional[int] = dspy.OutputField()  # noqa: UP045  (the spelling users write)
    b: int | None = dspy.OutputField()
    c: Optional[list[str]] = dspy.OutputField()  # noqa: UP045
    d: Optional[float] = dspy.OutputField()  # noqa: UP045
    e: Optional[Literal["yes", "no"]] = dspy.OutputField()  # noqa: UP045


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
def test_unscripted_optional_fields_get_a_value_of_their_inner_type(adapter: dspy.Adapter) -> None:
    with dspy.context(lm=FakeLM({}), adapter=adapter):
        r = dspy.Predict(Optionals)(q="x")
    assert (r.a, r.b, r.c, r.d, r.e) == (1, 1, ["ok"], 1.0, "yes")


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
def test_a_field_scripted_as_none_answers_none(adapter: dspy.Adapter) -> None:
    with dspy.context(lm=FakeLM({"a": None, "c": None}), adapter=adapter):
        r = dspy.Predict(Optionals)(q="x")
    assert (r.a, r.b, r.c) == (None, 1, None)


def test_none_for_an_optional_str_in_the_chat_format_is_refused_not_read_as_text() -> None:
    class Note(dspy.Signature):
        """Answer."""

        q: str = dspy.InputField()
        note: Optional[str] = dspy.OutputField()  # noqa: UP045

    with dspy.context(lm=FakeLM({"note": None})), pytest.raises(Exception, match="scripted as None"):
        dspy.Predict(Note)(q="x")
    with dspy.context(lm=FakeLM({"note": None}), adapter=dspy.JSONAdapter()):
        assert dspy.Predict(Note)(q="x").note is None


class Lists(dspy.Signature):
    """Answer."""

    q: str = dspy.InputField()
    a: list[int] = dspy.OutputField()
    b: list[Literal["x", "y"]] = dspy.OutputField()
    c: Optional[list[bool]] = dspy.OutputField()  # noqa: UP045
    d: list[str] = dspy.OutputField()
    e: list[float] = dspy.OutputField()


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()], ids=["chat", "json"])
def test_unscripted_list_fields_get_one_item_of_their_item_type(adapter: dspy.Adapter) -> None:
    """(helper 110) Every list got ``["ok"]``, which a ``list[int]`` or ``list[Literal]`` cannot parse."""
    with dspy.context(lm=FakeLM({}), adapter=adapter):
        r = dspy.Predict(Lists)(q="x")
    assert (r.a, r.b, r.c, r.d, r.e) == ([1], ["x"], [True], ["ok"], [1.0])
