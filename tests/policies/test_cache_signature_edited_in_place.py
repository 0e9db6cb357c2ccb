"""A signature's field edited in place on the *same* class — its default, description, prefix or
type — changes the predictor's fingerprint on the next call, so a ``CachedStage`` never serves an
answer computed under the old field (it did: the signature was described once per class)."""

from collections.abc import Callable
from typing import Any

import dspy
import pytest
from pydantic_core import PydanticUndefined

import stageflow
from stageflow import CachedStage, SequentialPipeline
from stageflow.testing import FakeLM, call


def _signature() -> type[dspy.Signature]:
    class Styled(dspy.Signature):
        """Answer in a style."""

        question: str = dspy.InputField()
        style: str = dspy.InputField(default="short")
        answer: str = dspy.OutputField()

    return Styled


def _styled_lm(calls: list[str]) -> FakeLM:
    def answer(inputs: dict[str, Any]) -> str:
        calls.append(inputs["question"])
        return f"{inputs['question']}|{inputs.get('style')}"

    return FakeLM({"answer": answer})


async def test_a_cached_stage_sees_a_default_edited_in_place(mode: str) -> None:
    sig = _signature()
    calls: list[str] = []
    pipe = SequentialPipeline([CachedStage(dspy.Predict(sig))])
    with dspy.context(lm=_styled_lm(calls)):
        assert (await call(pipe, mode, question="q")).answer == "q|short"
        assert (await call(pipe, mode, question="q")).answer == "q|short"
        assert len(calls) == 1  # (the second call was a cache hit)
        sig.model_fields["style"].default = "long"
        assert (await call(pipe, mode, question="q")).answer == "q|long"
        assert len(calls) == 2
        sig.model_fields["style"].default = "short"  # (back: the first answer is right again)
        assert (await call(pipe, mode, question="q")).answer == "q|short"
        assert len(calls) == 2


def _edit_default(sig: Any) -> None:
    sig.model_fields["style"].default = "long"


def _remove_default(sig: Any) -> None:
    sig.model_fields["style"].default = PydanticUndefined


def _edit_description(sig: Any) -> None:
    sig.model_fields["answer"].json_schema_extra["desc"] = "one word"


def _edit_prefix(sig: Any) -> None:
    sig.model_fields["answer"].json_schema_extra["prefix"] = "Reply:"


def _edit_type(sig: Any) -> None:
    sig.model_fields["answer"].annotation = list[str]


def _replace_extra(sig: Any) -> None:
    field = sig.model_fields["answer"]
    field.json_schema_extra = {**field.json_schema_extra, "desc": "one word"}


@pytest.mark.parametrize(
    "edit",
    [_edit_default, _remove_default, _edit_description, _edit_prefix, _edit_type, _replace_extra],
)
def test_every_field_edit_in_place_changes_the_fingerprint(edit: Callable[[Any], None]) -> None:
    sig = _signature()
    predictor = dspy.Predict(sig)
    pipe = SequentialPipeline([predictor])
    before = (stageflow.fingerprint(predictor), stageflow.fingerprint(pipe))
    assert before == (stageflow.fingerprint(predictor), stageflow.fingerprint(pipe))  # (memo hit)
    edit(sig)
    after = (stageflow.fingerprint(predictor), stageflow.fingerprint(pipe))
    assert after[0] != before[0]
    assert after[1] != before[1]
    # the memo and a fresh hash agree
    assert after == (stageflow.fingerprint(predictor, fresh=True), stageflow.fingerprint(pipe, fresh=True))


def test_the_same_edit_on_two_equal_signatures_gives_equal_fingerprints() -> None:
    a, b = _signature(), _signature()
    _edit_default(a)
    _edit_default(b)
    assert stageflow.fingerprint(dspy.Predict(a)) == stageflow.fingerprint(dspy.Predict(b))
    assert stageflow.fingerprint(dspy.Predict(a)) != stageflow.fingerprint(dspy.Predict(_signature()))


def test_a_signature_held_as_an_attribute_is_watched_too() -> None:
    sig = _signature()

    class Holder:
        def __init__(self) -> None:
            self.sig = sig

        def __call__(self, question: str) -> dict[str, str]:
            return {"answer": question}

    holder = Holder()
    before = stageflow.fingerprint(holder)
    _edit_description(sig)
    assert stageflow.fingerprint(holder) != before


def test_a_default_whose_equality_is_not_a_bool_is_taken_as_a_change() -> None:
    class Ambiguous:
        def __eq__(self, other: object) -> bool:
            raise ValueError("truth value is ambiguous")  # (as a numpy array's ==)

        __hash__ = object.__hash__

        def __repr__(self) -> str:
            return "Ambiguous()"

    sig = _signature()
    sig.model_fields["style"].default = Ambiguous()
    predictor = dspy.Predict(sig)
    first = stageflow.fingerprint(predictor)
    assert stageflow.fingerprint(predictor) == first
    sig.model_fields["style"].default = Ambiguous()  # (an equal-looking replacement: same digest)
    assert stageflow.fingerprint(predictor) == first
    sig.model_fields["style"].default = "long"
    assert stageflow.fingerprint(predictor) != first
