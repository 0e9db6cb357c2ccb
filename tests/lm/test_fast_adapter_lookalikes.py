"""Things that look the same to a cache but are not: equal annotations that validate differently,
and an adapter instance with its own formatting methods. The fast path must answer as DSPy does."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Union

import dspy
import pytest

import stageflow
from stageflow.lm.fast import FastChatAdapter, FastJSONAdapter, fast_adapter_for, fast_path_stats
from stageflow.lm.fast import adapters as fast_adapters
from stageflow.testing import FakeLM


def _sig(annotation: Any) -> Any:
    return dspy.Signature({"question": (str, dspy.InputField()), "answer": (annotation, dspy.OutputField())})


def _chat(v: str) -> str:
    return f"[[ ## answer ## ]]\n{v}\n\n[[ ## completed ## ]]"


def _json(v: str) -> str:
    return f'{{"answer": {v}}}'


ADAPTERS: list[tuple[type, type, Callable[[str], str]]] = [
    (FastChatAdapter, dspy.ChatAdapter, _chat),
    (FastJSONAdapter, dspy.JSONAdapter, _json),
]


@pytest.mark.parametrize(("fast_cls", "plain_cls", "completion"), ADAPTERS, ids=["chat", "json"])
@pytest.mark.parametrize(
    ("first", "second"),
    [
        (Union[int, bool], Union[bool, int]),  # noqa: UP007  (equal and of one hash in Python)
        (int | float, float | int),
        (list[Union[int, bool]], list[Union[bool, int]]),  # noqa: UP007
    ],
    ids=["int-bool", "int-float", "list"],
)
@pytest.mark.parametrize("answer", ["1.0", '"1"', "true", "[1.0]", '["1"]'])
def test_equal_annotations_in_another_order_parse_as_dspy_does(
    monkeypatch: pytest.MonkeyPatch,
    fast_cls: type,
    plain_cls: type,
    completion: Callable[[str], str],
    first: Any,
    second: Any,
    answer: str,
) -> None:
    monkeypatch.setattr(fast_adapters, "VERIFY_FIRST_CALL", False)  # no self-check to hide behind
    a, b = _sig(first), _sig(second)
    fast, plain = fast_cls(), plain_cls()
    text = completion(answer)
    with contextlib.suppress(Exception):
        fast.parse(a, text)  # the first annotation's validator is made (and cached) first
    try:
        expected: Any = plain.parse(b, text)
    except Exception as e:  # DSPy refuses it: so must the fast path
        with pytest.raises(type(e)):
            fast.parse(b, text)
        return
    got = fast.parse(b, text)
    assert repr(got) == repr(expected)


def test_a_pipeline_answers_with_the_order_of_its_own_annotation() -> None:
    from dspy.utils import DummyLM

    pa = stageflow.SequentialPipeline([dspy.Predict(_sig(Union[int, bool]))])  # noqa: UP007
    pb = stageflow.SequentialPipeline([dspy.Predict(_sig(Union[bool, int]))])  # noqa: UP007
    with dspy.context(lm=DummyLM([{"answer": "5"}, {"answer": "5"}, {"answer": "1.0"}])):
        pa(question="a")
        pb(question="b")
        assert pb(question="c").answer is True  # what DSPy's adapter gives


def _french(adapter: Any) -> Any:
    adapter.format_task_description = lambda sig: (
        "In adhering to this structure, your objective is: ANSWER IN FRENCH."
    )
    adapter.user_message_output_requirements = lambda sig: "Reply in French!"
    return adapter


@pytest.mark.parametrize("fast", [True, False])
def test_an_adapter_instance_with_its_own_formatting_methods_is_honoured(fast: bool) -> None:
    qa = dspy.Predict("question -> answer")
    plain_adapter, french = dspy.ChatAdapter(), _french(dspy.ChatAdapter())
    p = stageflow.SequentialPipeline([qa])
    p.fast_path = fast
    with dspy.context(lm=FakeLM({"answer": "x"}), adapter=plain_adapter):
        p(question="q")  # a plan for this signature exists from here on
    lm = FakeLM({"answer": "x"})
    with dspy.context(lm=lm, adapter=french):
        p(question="q")
    system, user = lm.history[-1]["messages"][0]["content"], lm.history[-1]["messages"][-1]["content"]
    assert "ANSWER IN FRENCH." in system
    assert user.endswith("Reply in French!")


def test_an_instance_override_set_after_the_twin_was_made_is_seen_and_named() -> None:
    user = dspy.ChatAdapter()
    twin = fast_adapter_for(user)
    sig = _sig(str)
    first = twin.format(sig, [], {"question": "q"})
    _french(user)  # the twin shares the user's attributes
    before = dict(fast_path_stats().fallbacks)
    second = twin.format(sig, [], {"question": "q"})
    assert first != second
    assert second == user.format(sig, [], {"question": "q"})
    after = fast_path_stats().fallbacks
    reason = "the adapter instance sets its own format_task_description"
    assert after.get(reason, 0) == before.get(reason, 0) + 1


def test_a_formatting_method_patched_on_dspys_class_after_first_use_is_honoured(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    p = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=FakeLM({"answer": "x"}), adapter=dspy.ChatAdapter()):
        p(question="q")  # the plan (and its system message) exists from here on
    monkeypatch.setattr(dspy.ChatAdapter, "format_task_description", lambda self, sig: "PATCHED task.")
    lm = FakeLM({"answer": "x"})
    with dspy.context(lm=lm, adapter=dspy.ChatAdapter()):
        p(question="q")
    assert "PATCHED task." in lm.history[-1]["messages"][0]["content"]
    monkeypatch.undo()
    again = FakeLM({"answer": "x"})
    with dspy.context(lm=again, adapter=dspy.ChatAdapter()):
        p(question="q")
    assert "PATCHED" not in again.history[-1]["messages"][0]["content"]


@pytest.mark.parametrize(
    ("cls", "name", "patch", "check"),
    [
        (dspy.ChatAdapter, "parse", lambda self, sig, completion: {"answer": "PATCHED"}, "answer"),
        (dspy.ChatAdapter, "format", None, "prompt"),
    ],
    ids=["parse", "format"],
)
def test_a_method_the_fast_path_takes_over_patched_on_dspys_class_is_honoured(
    monkeypatch: pytest.MonkeyPatch, cls: type, name: str, patch: Any, check: str
) -> None:
    p = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=FakeLM({"answer": "x"})):
        p(question="q")
    if patch is None:
        original = cls.format

        def patch(self: Any, signature: Any, demos: Any, inputs: Any) -> Any:
            messages = original(self, signature, demos, inputs)
            messages[0]["content"] = "PATCHED " + messages[0]["content"]
            return messages

    monkeypatch.setattr(cls, name, patch)
    lm = FakeLM({"answer": "x"})
    with dspy.context(lm=lm):
        result = p(question="q")
    if check == "answer":
        assert result.answer == "PATCHED"
    else:
        assert lm.history[-1]["messages"][0]["content"].startswith("PATCHED ")
