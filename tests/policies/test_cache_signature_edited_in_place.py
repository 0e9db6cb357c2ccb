"""A signature's field edited in place on the *same* class — its default, description, prefix or
type — changes the predictor's fingerprint on the next call, so a ``CachedStage`` never serves an
answer computed under the old field (it did: the signature was described once per class)."""

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import dspy
import pydantic
import pytest
from pydantic_core import PydanticUndefined

import stageflow
from stageflow import CachedStage, SequentialPipeline, _fp_digest, _fp_types
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


# -- what the second check found (each a stale CachedStage answer before) ------------------------


@pytest.mark.parametrize(("before", "after"), [(1, True), (1, 1.0), (0, False), ([1], [True])])
def test_a_default_replaced_by_an_equal_value_of_another_type_is_a_change(before: Any, after: Any) -> None:
    sig = _signature()
    sig.model_fields["style"].default = before
    predictor = dspy.Predict(sig)
    first = stageflow.fingerprint(predictor)
    sig.model_fields["style"].default = after
    assert stageflow.fingerprint(predictor) != first
    assert stageflow.fingerprint(predictor, fresh=True) != first


async def test_a_list_default_edited_in_place_is_a_change(mode: str) -> None:
    sig = _signature()
    tags: list[str] = ["a"]
    sig.model_fields["style"].default = tags
    calls: list[str] = []
    pipe = SequentialPipeline([CachedStage(dspy.Predict(sig))])
    with dspy.context(lm=_styled_lm(calls)):
        first = (await call(pipe, mode, question="q")).answer
        assert (await call(pipe, mode, question="q")).answer == first  # (a hit)
        tags.append("b")
        assert (await call(pipe, mode, question="q")).answer != first  # (asked again, with both tags)
    assert len(calls) == 2


def test_literal_options_reordered_in_place_are_a_change() -> None:
    sig = _signature()
    sig.model_fields["answer"].annotation = Literal["a", "b"]
    predictor = dspy.Predict(sig)
    first = stageflow.fingerprint(predictor)
    sig.model_fields["answer"].annotation = Literal["b", "a"]  # (== the first: typing compares sets)
    assert stageflow.fingerprint(predictor) != first


async def test_an_output_model_rebuilt_in_place_with_a_new_field_is_a_change(mode: str) -> None:
    class Info(pydantic.BaseModel):
        name: str

    class Extract(dspy.Signature):
        """Extract."""

        text: str = dspy.InputField()
        info: Info = dspy.OutputField()

    lm = FakeLM({"info": lambda i: {"name": "n", "age": 3}})
    predictor = dspy.Predict(Extract)
    pipe = SequentialPipeline([CachedStage(predictor)])
    with dspy.context(lm=lm):
        assert (await call(pipe, mode, text="t")).info == Info(name="n")
        first = stageflow.fingerprint(predictor)
        Info.model_fields["age"] = pydantic.fields.FieldInfo(annotation=int, default=0)
        Info.model_rebuild(force=True)
        assert (await call(pipe, mode, text="t")).info.age == 3  # (asked again, not the cached answer)
    assert stageflow.fingerprint(predictor) != first
    assert lm.calls == 2


def test_a_field_edited_while_the_signature_is_described_cannot_pair_one_state_with_another() -> None:
    # Another thread edits the default while the digest is being computed: the stored digest must
    # describe the view it is stored with, so the settled state gets its own fingerprint.
    sig = _signature()
    predictor = dspy.Predict(sig)
    truth = {}
    for value in ("a", "b"):
        sig.model_fields["style"].default = value
        truth[value] = stageflow.fingerprint(dspy.Predict(_signature_with(value)), fresh=True)
    sig.model_fields["style"].default = "a"
    original = _fp_types.describe_type

    def editing(tp: Any, depth: int = 0) -> str:
        sig.model_fields["style"].default = "b"  # (mid-description)
        return original(tp, depth)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fp_digest, "describe_type", editing)
        stageflow.fingerprint(predictor, fresh=True)
    sig.model_fields["style"].default = "a"  # (the edit settles back)
    assert stageflow.fingerprint(predictor) == truth["a"]
    assert stageflow.fingerprint(predictor, fresh=True) == truth["a"]


def _signature_with(style: str) -> type[dspy.Signature]:
    sig = _signature()
    sig.model_fields["style"].default = style
    return sig


# -- what the third check found ------------------------------------------------------------------


def test_negative_zero_is_another_default() -> None:
    sig = _signature()
    sig.model_fields["style"].default = 0.0
    predictor = dspy.Predict(sig)
    first = stageflow.fingerprint(predictor)
    sig.model_fields["style"].default = -0.0
    assert stageflow.fingerprint(predictor) != first
    assert stageflow.fingerprint(predictor, fresh=True) != first


class _Shown:
    """An object DSPy sends by its str (its repr is the default one, with an address)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return f"Style<{self.text}>"


@dataclasses.dataclass
class _Secret:
    name: str
    secret: str = dataclasses.field(repr=False)  # (left out of repr, still sent by DSPy)


@pytest.mark.parametrize(
    ("make", "edit"),
    [
        (lambda: _Shown("short"), lambda d: setattr(d, "text", "long")),
        (lambda: _Secret("n", "a"), lambda d: setattr(d, "secret", "b")),
    ],
    ids=["str-only", "repr-false-field"],
)
def test_a_default_edited_in_place_where_its_repr_does_not_show_it_is_a_change(
    make: Callable[[], Any], edit: Callable[[Any], None]
) -> None:
    sig = _signature()
    default = make()
    sig.model_fields["style"].default = default
    predictor = dspy.Predict(sig)
    first = stageflow.fingerprint(predictor)
    edit(default)
    assert stageflow.fingerprint(predictor) != first
    assert stageflow.fingerprint(predictor, fresh=True) != first


def test_a_default_with_an_address_in_its_repr_gets_the_same_fingerprint_in_every_process() -> None:
    fingerprints = set()
    for _ in range(2):  # (two objects at two addresses stand for two processes)
        sig = _signature()
        sig.model_fields["style"].default = _Shown("short")
        fingerprints.add(stageflow.fingerprint(dspy.Predict(sig), fresh=True))
    assert len(fingerprints) == 1


def test_a_field_edited_and_edited_back_while_hashing_is_not_remembered_as_the_other_state() -> None:
    # A -> (hashing sees B) -> A: the tokens before and after agree, but the hash described B.
    sig = _signature()
    predictor = dspy.Predict(sig)
    truth = {v: stageflow.fingerprint(dspy.Predict(_signature_with(v)), fresh=True) for v in ("a", "b")}
    sig.model_fields["style"].default = "a"
    original = _fp_digest._signature_digest

    def toggling(described: Any) -> str:  # (another thread's edits, around the description)
        sig.model_fields["style"].default = "b"
        try:
            return original(described)
        finally:
            sig.model_fields["style"].default = "a"

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fp_digest, "_signature_digest", toggling)
        stageflow.fingerprint(predictor)
    assert stageflow.fingerprint(predictor) == truth["a"]


@pytest.mark.parametrize("wrap", ["newtype", "alias", "dataclass"])
def test_a_model_named_through_a_newtype_an_alias_or_a_dataclass_is_described_and_watched(wrap: str) -> None:
    import typing

    import typing_extensions

    class M(pydantic.BaseModel):
        text: str

    @dataclasses.dataclass
    class Box:
        m: M

    annotation = {
        "newtype": typing.NewType("Ans", M),
        "alias": typing_extensions.TypeAliasType("Ans", list[M]),
        "dataclass": Box,
    }[wrap]
    namespace = {"__doc__": "Answer.", "__annotations__": {"question": str, "answer": annotation}}
    namespace.update(question=dspy.InputField(), answer=dspy.OutputField())
    sig = type("Sig", (dspy.Signature,), namespace)
    predictor = dspy.Predict(sig)
    assert "text" in _fp_types.describe_type(annotation)  # (by the model, not by a name: across processes)
    first = stageflow.fingerprint(predictor)
    M.model_fields["score"] = pydantic.fields.FieldInfo(annotation=int, default=7)
    M.model_rebuild(force=True)
    assert stageflow.fingerprint(predictor) != first
    assert "score" in _fp_types.describe_type(annotation)


def test_instructions_edited_while_the_signature_is_described_cannot_pair_with_the_digest() -> None:
    sig = _signature()
    reference = {}
    for doc in ("Answer A.", "Answer B."):
        sig.__doc__ = doc
        _fp_digest._SIG_DIGESTS.pop(sig, None)
        reference[doc] = _fp_digest._signature_digest(sig)
    sig.__doc__ = "Answer A."
    _fp_digest._SIG_DIGESTS.pop(sig, None)
    original = _fp_digest.field_view

    def editing(described: Any) -> Any:  # (another thread edits the doc after it was read)
        view = original(described)
        sig.__doc__ = "Answer B."
        return view

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fp_digest, "field_view", editing)
        assert _fp_digest._signature_digest(sig) == reference["Answer A."]
