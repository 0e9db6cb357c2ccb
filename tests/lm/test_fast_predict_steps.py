"""``Predict``'s own steps on the stage path (``stageflow.lm.fast._predict``) against DSPy's methods.

``preprocess`` must give what ``dspy.Predict._forward_preprocess`` gives — the same LM, config,
signature, demos and inputs (in the same order), the same warnings, the same errors — and
``postprocess`` the same ``Prediction`` (attribute for attribute) and the same trace entry as
``_forward_postprocess``, for every signature of the fast-adapter corpus and for the inputs DSPy
treats specially (defaults, missing, extra, mistyped, ``Predict``'s own keywords). The stage path as
a whole (``call_predictor`` / ``acall_predictor``) must give what calling the module gives, and use
DSPy's methods when they are replaced.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from typing import Any

import dspy
import pytest
from test_fast_adapter_corpus import CASES, IDS, Case, ScriptedLM, canonical_answer, outcome

from stageflow.lm.fast import FastChatAdapter, _predict, call_predictor
from stageflow.lm.fast._predict import postprocess, preprocess, untouched
from stageflow.lm.fast.call import acall_predictor
from stageflow.testing import FakeLM

_DSPY_PRE = dspy.Predict._forward_preprocess
_DSPY_POST = dspy.Predict._forward_postprocess


def _pre_outcome(fn: Any, predictor: Any, caplog: pytest.LogCaptureFixture) -> Any:
    caplog.clear()
    try:
        lm, config, signature, demos, kwargs = fn()
        # (a signature passed as a string is built anew by each call: compared by what it says)
        said = (signature is predictor.signature, signature.signature, signature.instructions)
        got: Any = ("ok", lm, config, said, demos, list(kwargs.items()))
    except Exception as e:
        got = ("error", type(e), str(e))
    return got, [(r.levelno, r.getMessage()) for r in caplog.records]


def _same_preprocess(predictor: Any, inputs: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    before = dict(inputs)
    expected = _pre_outcome(lambda: _DSPY_PRE(predictor, **inputs), predictor, caplog)
    got = _pre_outcome(lambda: preprocess(predictor, vars(predictor), inputs), predictor, caplog)
    assert got == expected
    assert inputs == before  # (the caller's dict is left as it was)


def _variants(case: Case) -> list[dict[str, Any]]:
    names = list(case.signature.input_fields)
    first = names[0]
    return [
        dict(case.inputs),
        {k: v for k, v in case.inputs.items() if k != first},  # a required input missing
        {**case.inputs, "surplus": 1},  # an input the signature does not have
        {**case.inputs, first: None},
        {**case.inputs, first: 12345},  # (mistyped for typed fields)
        {**case.inputs, first: ["a", "b"]},  # (a list for a str field is allowed)
        dict(reversed(case.inputs.items())),  # (the order kept as given)
    ]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_preprocess_matches_dspy_on_the_corpus(case: Case, caplog: pytest.LogCaptureFixture) -> None:
    predictor = dspy.Predict(case.signature)
    predictor.demos = list(case.demos)
    caplog.set_level(logging.WARNING)
    with dspy.context(lm=FakeLM()):
        for inputs in _variants(case):
            _same_preprocess(predictor, inputs, caplog)
        with dspy.context(warn_on_type_mismatch=False):
            _same_preprocess(predictor, {**case.inputs, next(iter(case.inputs)): 12345}, caplog)


class WithDefaults(dspy.Signature):
    """Answer."""

    question: str = dspy.InputField()
    style: str = dspy.InputField(default="short")
    hint: str | None = dspy.InputField()
    count: int = dspy.InputField(default=3)
    answer: str = dspy.OutputField()


def _other_lm() -> FakeLM:
    return FakeLM({"answer": "other"})


@pytest.mark.parametrize(
    "inputs",
    [
        {"question": "q"},  # two defaults filled in, an optional input left out (no warning)
        {"question": "q", "style": "long", "count": 1, "hint": "h"},
        {"question": "q", "count": "three"},  # mistyped: DSPy warns
        {"question": "q", "count": True},  # (bool is an int to DSPy's check)
        {"style": "s"},  # the required input missing
        {"question": "q", "config": {"temperature": 0.3}},  # Predict's own keywords
        {"question": "q", "demos": [dspy.Example(question="d", answer="e")]},
        {"question": "q", "lm": "openai/gpt"},
        {"question": "q", "prediction": {"type": "content", "content": "x"}},
        {"question": "q", "prediction": "plain input"},
        {"question": "q", "signature": "question -> answer"},
        {"question": "q", "new_signature": "x"},
        {"question": "q", "_trace": False},
    ],
    ids=lambda d: ",".join(d),
)
def test_preprocess_matches_dspy_for_special_inputs(
    inputs: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    predictor = dspy.Predict(WithDefaults)
    caplog.set_level(logging.WARNING)
    with dspy.context(lm=FakeLM()):
        _same_preprocess(predictor, inputs, caplog)


@pytest.mark.parametrize(
    ("own_lm", "settings_lm", "config"),
    [
        ("mine", "global", {}),
        (None, "global", {}),
        (None, None, {}),  # no LM: DSPy's error
        (None, "a string", {}),  # DSPy's error for a model name given as the LM
        (None, "global", {"n": 3}),  # n > 1 with no temperature: 0.7
        (None, "global", {"n": 3, "temperature": 0.1}),
        (None, "global", {"n": 3, "temperature": 0.9}),
        (None, "n3", {}),  # n from the LM's own kwargs
        (None, "generations", {"temperature": 0.0}),
    ],
)
def test_preprocess_matches_dspy_for_lms_and_configs(
    own_lm: str | None, settings_lm: str | None, config: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    lms: dict[str | None, Any] = {
        None: None,
        "mine": _other_lm(),
        "global": FakeLM(),
        "a string": "openai/gpt-4o-mini",
        "n3": dspy.LM("openai/x", n=3, cache=False),
        "generations": dspy.LM("openai/x", num_generations=2, cache=False),
    }
    predictor = dspy.Predict("question -> answer", **config)
    predictor.lm = lms[own_lm]
    with dspy.context(lm=lms[settings_lm]):
        _same_preprocess(predictor, {"question": "q"}, caplog)
    assert predictor.config == config  # (the predictor's own config is copied, not changed)


def _post_outcome(fn: Any) -> Any:
    try:
        pred = fn()
    except Exception as e:
        return ("error", type(e), str(e))
    attrs = dict(vars(pred))
    completions = attrs.pop("_completions")
    found = None if completions is None else list(vars(completions).items())
    return ("ok", type(pred), list(attrs.items()), type(completions), found)


@pytest.mark.parametrize(
    "completions",
    [
        [{"answer": "a"}],
        [{"answer": "a", "reasoning": "r"}, {"answer": "b", "reasoning": "s"}],
        [],
        [{"answer": "a"}, {"other": "b"}],  # keys that differ, lists of one length: DSPy takes it
        [{"answer": "a", "x": 1}, {"answer": "b"}],  # lists of two lengths: DSPy refuses
        ({"answer": "a"},),  # not a list
        [dspy.Prediction(answer="a")],  # not dicts
    ],
    ids=["one", "two", "none", "ragged-keys", "ragged-lengths", "tuple", "predictions"],
)
@pytest.mark.parametrize("trace", ["off", "on", "full", "size-0"])
def test_postprocess_matches_dspy(completions: Any, trace: str) -> None:
    predictor = dspy.Predict("question -> answer")
    signature = predictor.signature
    results = []
    for fn in (_DSPY_POST, lambda p, c, s, **kw: postprocess(p, c, s, kw)):
        settings: dict[str, Any] = {
            "off": {"trace": None},
            "on": {"trace": []},
            "full": {
                "trace": [("old", {}, dspy.Prediction(a=1)), ("older", {}, dspy.Prediction(a=2))],
                "max_trace_size": 2,
            },
            "size-0": {"trace": [], "max_trace_size": 0},
        }[trace]
        with dspy.context(**settings):
            got = _post_outcome(lambda fn=fn: fn(predictor, completions, signature, question="q"))
            kept = [(p, kw, _post_outcome(lambda pred=pred: pred)) for p, kw, pred in settings["trace"] or []]
        results.append((got, kept))
    assert results[0] == results[1]


def test_postprocess_leaves_the_trace_alone_when_asked() -> None:
    predictor = dspy.Predict("question -> answer")
    with dspy.context(trace=[]):
        pred = postprocess(
            predictor, [{"answer": "a"}], predictor.signature, {"question": "q", "_trace": False}
        )
        assert dspy.settings.trace == []
    assert pred.answer == "a"


# -- the stage path as a whole --------------------------------------------------------------------


def _call(module: Any, inputs: dict[str, Any], mode: str, stage_path: bool) -> Any:
    if mode == "sync":
        return call_predictor(module, inputs) if stage_path else module(**inputs)
    return asyncio.run(acall_predictor(module, inputs) if stage_path else module.acall(**inputs))


def _observed(case: Case, mode: str, stage_path: bool) -> Any:
    lm = ScriptedLM([canonical_answer("chat", case)])
    predictor = dspy.Predict(case.signature)
    predictor.demos = list(case.demos)
    with dspy.context(lm=lm, adapter=FastChatAdapter(), trace=[]):
        result = outcome(lambda: _call(predictor, case.inputs, mode, stage_path))
        trace = [(kw, dict(pred)) for _, kw, pred in dspy.settings.trace]
    return result, trace, len(predictor.history), [e["messages"] for e in lm.history]


@pytest.mark.parametrize("case", [c for c in CASES if c.fast], ids=[c.id for c in CASES if c.fast])
def test_the_stage_path_gives_what_calling_the_module_gives(case: Case, mode: str) -> None:
    assert _observed(case, mode, True) == _observed(case, mode, False)


@pytest.mark.parametrize("name", ["preprocess", "postprocess", "from_completions", "completions"])
def test_replaced_dspy_methods_are_called(name: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    if name == "preprocess":
        monkeypatch.setattr(
            dspy.Predict, "_forward_preprocess", lambda self, **kw: seen.append(name) or _DSPY_PRE(self, **kw)
        )
    elif name == "postprocess":
        monkeypatch.setattr(
            dspy.Predict,
            "_forward_postprocess",
            lambda self, c, s, **kw: seen.append(name) or _DSPY_POST(self, c, s, **kw),
        )
    elif name == "from_completions":
        original = dspy.Prediction.__dict__["from_completions"].__func__
        monkeypatch.setattr(
            dspy.Prediction,
            "from_completions",
            classmethod(lambda cls, c, signature=None: seen.append(name) or original(cls, c, signature)),
        )
    else:
        from dspy.primitives.prediction import Completions

        init = Completions.__init__
        monkeypatch.setattr(
            Completions, "__init__", lambda self, *a, **kw: seen.append(name) or init(self, *a, **kw)
        )
    assert not untouched()
    with dspy.context(lm=FakeLM({"answer": "4"})):
        assert _call(dspy.Predict("question -> answer"), {"question": "2+2?"}, mode, True).answer == "4"
    assert seen
    monkeypatch.undo()
    assert untouched()


def test_each_watched_method_replaced_turns_the_shortcut_off() -> None:
    # (in a fresh interpreter: a __new__ set on a class and deleted again leaves CPython's class
    # slots changed, which would break later tests)
    script = textwrap.dedent(
        """
        from stageflow.lm.fast import _predict
        from stageflow.lm.fast._predict import untouched

        missed = []
        for owner, name, _ in _predict._WATCHED:
            assert untouched()
            own = vars(owner)
            had, before = name in own, own.get(name)
            original = before if name == "from_completions" else getattr(owner, name)
            if isinstance(original, type):
                replacement = type(original.__name__, (original,), {})
            elif isinstance(original, classmethod):
                replacement = classmethod(lambda cls, *a, f=original.__func__, **kw: f(cls, *a, **kw))
            else:
                replacement = lambda *a, f=original, **kw: f(*a, **kw)
            setattr(owner, name, replacement)
            if untouched():
                missed.append(name)
            if had:
                setattr(owner, name, before)
            else:
                delattr(owner, name)
        assert untouched()
        print(len(_predict._WATCHED), missed)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(len(_predict._WATCHED)), "[]"]
