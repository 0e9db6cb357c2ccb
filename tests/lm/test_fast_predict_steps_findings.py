"""What the checkers of the stage path's ``Predict`` steps found (each reproducer, as a test).

Each scenario runs a predictor the stage path's way and by plain DSPy (sync and async where it
calls), and compares what the LM was sent, the prediction, the trace and the warnings.
"""

import asyncio
import contextlib
import copy
import logging
import subprocess
import sys
import textwrap
from typing import Any

import dspy
import pydantic
import pytest
from dspy.adapters.types.decision import Choice
from dspy.utils.exceptions import AdapterParseError
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

import stageflow
from stageflow import SequentialPipeline
from stageflow.lm.fast import call_predictor
from stageflow.lm.fast.call import acall_predictor
from stageflow.testing import FakeLM, call


def _stage_path(module: Any, inputs: dict[str, Any], mode: str) -> Any:
    if mode == "sync":
        return call_predictor(module, inputs)
    return asyncio.run(acall_predictor(module, inputs))


def _plain(module: Any, inputs: dict[str, Any], mode: str) -> Any:
    return module(**inputs) if mode == "sync" else asyncio.run(module.acall(**inputs))


def test_patches_made_before_stageflow_was_imported_are_honoured() -> None:
    # (in a fresh interpreter: the patch must come before stageflow's first import)
    script = textwrap.dedent(
        """
        import asyncio
        import dspy
        from dspy.primitives.prediction import Completions
        calls = []
        init, pre = Completions.__init__, dspy.Predict._forward_preprocess
        Completions.__init__ = lambda self, *a, **kw: calls.append("init") or init(self, *a, **kw)
        dspy.Predict._forward_preprocess = lambda self, **kw: calls.append("pre") or pre(self, **kw)
        import stageflow
        from stageflow.testing import FakeLM
        pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
        with dspy.context(lm=FakeLM({"answer": "4"})):
            assert pipe(question="x").answer == "4"
            assert asyncio.run(pipe.acall(question="x")).answer == "4"
        print(calls)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['pre', 'init', 'pre', 'init']"


def test_the_class_predict_builds_replaced_in_its_module_is_built(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Tagged(dspy.Prediction):  # type: ignore[misc]
        pass

    monkeypatch.setattr("dspy.predict.predict.Prediction", Tagged)
    with dspy.context(lm=FakeLM({"answer": "4"})):
        assert type(_stage_path(dspy.Predict("question -> answer"), {"question": "q"}, mode)) is Tagged


class _BadDefault(dspy.Signature):
    """Answer."""

    question: str = dspy.InputField()
    weight: float = dspy.InputField(default=0)  # (an int: DSPy warns about it on every call)
    answer: str = dspy.OutputField()


def test_a_mistyped_default_is_warned_about_as_dspy_warns(
    mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    seen = []
    for run in (_plain, _stage_path):
        caplog.clear()
        with dspy.context(lm=FakeLM({"answer": "a"})):
            run(dspy.Predict(_BadDefault), {"question": "q"}, mode)
        seen.append([r.getMessage() for r in caplog.records if "Type mismatch" in r.getMessage()])
    assert seen[0] == seen[1]
    assert len(seen[0]) == 1


def _with_hint() -> type[dspy.Signature]:
    class Sig(dspy.Signature):
        """Answer."""

        question: str = dspy.InputField()
        hint: str = dspy.InputField(default="none", desc="old desc")
        answer: str = dspy.OutputField()

    return Sig


def _after_edit(run: Any, mode: str, edit: Any, inputs: dict[str, Any]) -> Any:
    """What the LM was sent and the trace kept, for a call after ``edit`` changed the signature's
    fields dict in place (one call before it)."""
    signature = _with_hint()
    predictor = dspy.Predict(signature)
    lm = FakeLM({"answer": "4"})
    with dspy.context(lm=lm, trace=[]):
        run(predictor, {"question": "q", "hint": "h"}, mode)
        edit(signature.model_fields)
        run(predictor, inputs, mode)
        kwargs = dspy.settings.trace[-1][1]
    return lm.history[-1]["messages"], kwargs


def _replace_hint(fields: dict[str, Any]) -> None:
    new = copy.copy(fields["hint"])  # (no default any more, another description)
    new.default = PydanticUndefined
    new.json_schema_extra = {**new.json_schema_extra, "desc": "NEW desc"}
    fields["hint"] = new


def _rename_hint(fields: dict[str, Any]) -> None:
    fields["clue"] = fields.pop("hint")  # (a key renamed: as many fields, the same objects)
    fields["answer"] = fields.pop("answer")


def test_a_field_replaced_in_the_signatures_fields_is_seen(mode: str) -> None:
    expected = _after_edit(_plain, mode, _replace_hint, {"question": "q"})
    assert _after_edit(_stage_path, mode, _replace_hint, {"question": "q"}) == expected
    assert expected[1] == {"question": "q"}


def test_a_field_renamed_in_the_signatures_fields_is_seen(mode: str) -> None:
    inputs = {"question": "q", "clue": "c"}
    expected = _after_edit(_plain, mode, _rename_hint, inputs)
    assert _after_edit(_stage_path, mode, _rename_hint, inputs) == expected
    assert "clue" in expected[0][-1]["content"]


class _Slotted:
    __slots__ = ()

    def __call__(self, **kwargs: Any) -> Any:
        return dspy.Prediction(answer="from slotted")


@pytest.mark.parametrize("inner", ["slotted", "none", "deleted"])
def test_a_chain_of_thought_without_its_predictor_fails_or_runs_as_in_dspy(inner: str, mode: str) -> None:
    def outcome(run: Any) -> Any:
        cot = dspy.ChainOfThought("question -> answer")
        if inner == "deleted":
            del cot.predict
        else:
            cot.predict = _Slotted() if inner == "slotted" else None
        try:
            with dspy.context(lm=FakeLM({"answer": "4"})):
                return ("ok", run(cot, {"question": "q"}, mode).answer)
        except Exception as e:
            return ("error", type(e), str(e))

    assert outcome(_stage_path) == outcome(_plain)


def test_a_pipeline_can_be_built_around_a_chain_of_thought_with_a_slotted_predictor() -> None:
    cot = dspy.ChainOfThought("question -> answer")
    cot.predict = _Slotted()
    pipe = SequentialPipeline([stageflow.Stage(cot, inputs={"question": "question"}, writes=["answer"])])
    with dspy.context(lm=FakeLM({"answer": "4"})):
        assert pipe(question="q").answer == "from slotted"


def test_an_input_named_self_fails_as_in_dspy(mode: str) -> None:
    def outcome(run: Any) -> Any:
        try:
            with dspy.context(lm=FakeLM({"answer": "4"})):
                return ("ok", run(dspy.Predict("self -> answer"), {"self": "q"}, mode).answer)
        except Exception as e:
            return ("error", type(e), str(e))

    expected = outcome(_plain)
    assert expected[0] == "error"
    assert outcome(_stage_path) == expected


def _retyped_to_a_decision(run: Any, mode: str) -> str:
    class Sig(dspy.Signature):
        """Answer."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField(desc="yes or no")

    predictor = dspy.Predict(Sig)
    lm = FakeLM({"answer": "yes"})
    with dspy.context(lm=lm):
        run(predictor, {"question": "q"}, mode)
        Sig.model_fields["answer"].annotation = Choice["yes", "no"]
        with contextlib.suppress(
            Exception
        ):  # (the fake LM answers neither prompt: what it was sent is compared)
            run(predictor, {"question": "q"}, mode)
    return str(lm.history[-1]["messages"][0]["content"])


def test_an_output_retyped_in_place_to_a_decision_gets_dspys_decision_prompt(mode: str) -> None:
    assert _retyped_to_a_decision(_stage_path, mode) == _retyped_to_a_decision(_plain, mode)


def _rebuilt_model(fast: bool, mode: str) -> str:
    class Person(pydantic.BaseModel):
        name: str

    class Sig(dspy.Signature):
        """Answer."""

        question: str = dspy.InputField()
        person: Person = dspy.OutputField()

    pipe = SequentialPipeline([dspy.Predict(Sig)])
    pipe.fast_path = fast
    with dspy.context(lm=FakeLM({"person": {"name": "n", "age": 3}})):
        asyncio.run(call(pipe, mode, question="q"))
        Person.model_fields["age"] = FieldInfo(annotation=int)
        Person.model_rebuild(force=True)
        return repr(asyncio.run(call(pipe, mode, question="q")).person)


def test_a_pydantic_output_model_rebuilt_with_a_new_field_is_parsed_with_it(mode: str) -> None:
    assert _rebuilt_model(True, mode) == _rebuilt_model(False, mode) == "Person(name='n', age=3)"


class _Optional(dspy.Signature):
    """Answer."""

    question: str = dspy.InputField()
    context: str | None = dspy.InputField()
    style: str = dspy.InputField(default="short")
    answer: str = dspy.OutputField()


@pytest.mark.parametrize("kind", ["predict", "cot"])
async def test_inputs_dspy_runs_without_are_optional_in_a_pipeline(kind: str, mode: str) -> None:
    module = dspy.Predict(_Optional) if kind == "predict" else dspy.ChainOfThought(_Optional)
    pipe = SequentialPipeline([module])
    lm = FakeLM({"answer": "4", "reasoning": "r"})
    with dspy.context(lm=lm):
        assert (await call(pipe, mode, question="q")).answer == "4"
        sent_without = lm.history[-1]["messages"][-1]["content"]
        assert (await call(pipe, mode, question="q", context="c", style="long")).answer == "4"
        sent_with = lm.history[-1]["messages"][-1]["content"]
    assert "[[ ## context ## ]]" not in sent_without
    assert "short" in sent_without
    assert "[[ ## context ## ]]\nc" in sent_with
    assert "long" in sent_with
    ports = stageflow.Stage(module).ports
    assert ports.required == ("question",)
    assert set(ports.optional) == {"context", "style"}


@pytest.mark.parametrize(
    ("cls_name", "method"),
    [
        ("Prediction", "__setattr__"),
        ("Prediction", "__delattr__"),
        ("Completions", "__setattr__"),
        ("Completions", "items"),
    ],
)
def test_attribute_hooks_patched_on_what_predict_builds_are_honoured(
    cls_name: str, method: str, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dspy.primitives.prediction import Completions

    cls = dspy.Prediction if cls_name == "Prediction" else Completions
    original = getattr(cls, method)
    seen: list[str] = []
    monkeypatch.setattr(cls, method, lambda self, *a: seen.append(method) or original(self, *a))
    with dspy.context(lm=FakeLM({"answer": "4"})):
        assert _stage_path(dspy.Predict("question -> answer"), {"question": "q"}, mode).answer == "4"
    assert seen


class _AnswerOnly(dspy.BaseLM):  # type: ignore[misc]
    """Answers ``answer`` only (through DSPy's legacy interface, which warns that it is deprecated)."""

    def __init__(self) -> None:
        super().__init__(model="answer-only")

    def forward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        from types import SimpleNamespace

        message = SimpleNamespace(content="[[ ## answer ## ]]\n4\n\n[[ ## completed ## ]]", tool_calls=None)
        choice = SimpleNamespace(message=message, finish_reason="stop", logprobs=None)
        return SimpleNamespace(choices=[choice], usage={}, model="answer-only")

    async def aforward(self, prompt: Any = None, messages: Any = None, **kwargs: Any) -> Any:
        return self.forward(prompt, messages, **kwargs)


@pytest.mark.filterwarnings("ignore:Implementing custom LMs:DeprecationWarning")
async def test_an_output_default_removed_in_place_makes_the_output_required_as_in_dspy(mode: str) -> None:
    class Noted(dspy.Signature):
        """Answer."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()
        note: str = dspy.OutputField(default="none")

    pipe = SequentialPipeline([dspy.Predict(Noted)])
    with dspy.context(lm=_AnswerOnly()):
        assert (await call(pipe, mode, question="q")).note == "none"
        Noted.model_fields["note"].default = PydanticUndefined
        with pytest.raises(stageflow.StageError) as err:  # (DSPy raises AdapterParseError)
            await call(pipe, mode, question="q")
    assert isinstance(err.value.__cause__, AdapterParseError)
