"""``call_predictor``: the short call path leaves what DSPy records unchanged, and steps aside
whenever something it would skip is active."""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest
from dspy.clients.base_lm import GLOBAL_HISTORY
from test_fast_adapter_corpus import ScriptedLM, typed
from test_fast_adapter_integration import Recorder

from stageflow.lm.fast import acall_predictor, call_predictor, fast_adapter_for
from stageflow.lm.fast.call import short_path

MODES = ["sync", "async"]
ANSWER = "[[ ## reasoning ## ]]\nr\n\n[[ ## answer ## ]]\n4\n\n[[ ## completed ## ]]"


def by_module(module: Any, inputs: dict[str, Any], mode: str) -> Any:
    return module(**inputs) if mode == "sync" else asyncio.run(module.acall(**inputs))


def by_short_path(module: Any, inputs: dict[str, Any], mode: str) -> Any:
    return call_predictor(module, inputs) if mode == "sync" else asyncio.run(acall_predictor(module, inputs))


def record(call: Any, make: Any, mode: str, **settings: Any) -> dict[str, Any]:
    """Everything DSPy keeps about one call, in comparable form."""
    module = make()
    lm = ScriptedLM([ANSWER])
    trace: list[Any] = []
    with dspy.context(lm=lm, trace=trace, **settings):
        before = len(GLOBAL_HISTORY)
        pred = call(module, {"question": "2+2?"}, mode)
        global_new = len(GLOBAL_HISTORY) - before

    def entry(e: dict[str, Any]) -> Any:
        return {k: v for k, v in e.items() if k not in ("timestamp", "uuid", "response")}

    modules = [module, *([module.predict] if hasattr(module, "predict") else [])]
    return {
        "prediction": typed(pred.toDict()),
        "usage": pred.get_lm_usage(),
        "lm_history": [entry(e) for e in lm.history],
        "module_histories": [[entry(e) for e in m.history] for m in modules],
        "global_history": global_new,
        "trace": [(type(p).__name__, inputs, typed(out.toDict())) for p, inputs, out in trace],
        "trace_predictors": [p is modules[-1] for p, _, _ in trace],
    }


MAKERS = {
    "Predict": lambda: dspy.Predict("question -> reasoning, answer: int"),
    "ChainOfThought": lambda: dspy.ChainOfThought("question -> answer: int"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", sorted(MAKERS))
@pytest.mark.parametrize("fast", [False, True], ids=["dspy-adapter", "fast-adapter"])
def test_the_short_path_records_what_the_module_call_records(kind: str, mode: str, fast: bool) -> None:
    adapter = fast_adapter_for(None) if fast else None
    expected = record(by_module, MAKERS[kind], mode, adapter=adapter)
    got = record(by_short_path, MAKERS[kind], mode, adapter=adapter)
    assert got == expected
    assert expected["global_history"] == 1
    assert expected["trace_predictors"] == [True]


@pytest.mark.parametrize("mode", MODES)
def test_with_callbacks_the_module_is_called(mode: str) -> None:
    seen = []
    for call in (by_module, by_short_path):
        recorder = Recorder()
        record(call, MAKERS["ChainOfThought"], mode, callbacks=[recorder])
        seen.append(recorder.events)
    assert seen[0] == seen[1]
    assert [e[0] for e in seen[0]].count("module_start") == 2


@pytest.mark.parametrize("mode", MODES)
def test_with_usage_tracking_the_module_is_called(mode: str) -> None:
    expected = record(by_module, MAKERS["Predict"], mode, track_usage=True)
    got = record(by_short_path, MAKERS["Predict"], mode, track_usage=True)
    assert got == expected
    assert got["usage"]


def test_the_short_path_applies_only_to_plain_predictors() -> None:
    class MyPredict(dspy.Predict):
        pass

    patched = dspy.Predict("q -> a")
    patched.forward = lambda **kw: dspy.Prediction(a="patched")  # what GEPA does to an instance
    with_callbacks = dspy.Predict("q -> a", callbacks=[Recorder()])
    plain_cot = dspy.ChainOfThought("q -> a")
    assert short_path(dspy.Predict("q -> a")) is not None
    assert short_path(plain_cot) == [plain_cot, plain_cot.predict]
    for module in (MyPredict("q -> a"), patched, with_callbacks, dspy.ReAct("q -> a", tools=[])):
        assert short_path(module) is None
    with dspy.context(lm=ScriptedLM(["[[ ## a ## ]]\nlm\n\n[[ ## completed ## ]]"])):
        assert call_predictor(patched, {"q": "x"}).a == "patched"


def test_decision_outputs_keep_dspys_adapter_resolution() -> None:
    from dspy.adapters.types.decision import Noul

    from stageflow.lm.fast.call import _has_decisions

    assert _has_decisions(dspy.Signature("question -> answer")) is False
    assert _has_decisions(dspy.Signature({"q": (str, dspy.InputField()), "ok": (Noul, dspy.OutputField())}))
    nested = dspy.Signature({"q": (str, dspy.InputField()), "oks": (list[Noul], dspy.OutputField())})
    assert _has_decisions(nested)  # resolve_adapter warns about it, so it must run


@pytest.mark.parametrize("where", ["aforward", "acall", "inner aforward"])
def test_an_async_entry_point_set_on_an_instance_is_what_a_pipeline_runs(mode: str, where: str) -> None:
    """``pred.aforward = ...`` (or ``acall``, or the inner predictor's of a ChainOfThought) changes
    what ``await pred.acall()`` runs; the pipeline's stage call runs it too, on either path."""
    import stageflow
    from stageflow.testing import FakeLM, call

    async def patched(**kw: Any) -> dspy.Prediction:
        return dspy.Prediction(reasoning="r", answer="patched")

    module: Any = (
        dspy.ChainOfThought("question -> answer")
        if where == "inner aforward"
        else dspy.Predict("question -> answer")
    )
    setattr(module.predict if where == "inner aforward" else module, where.split()[-1], patched)
    program = stageflow.SequentialPipeline([module])
    with dspy.context(lm=FakeLM({"reasoning": "r", "answer": "from the model"})):
        got = asyncio.run(call(program, mode, question="q"))
    expected = "patched" if mode == "async" else "from the model"  # (the sync call runs forward)
    assert got.answer == expected


def test_a_wrapped_dspy_method_makes_stages_take_the_ordinary_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instrumentation (OpenInference) wraps ``Predict.forward`` on the class: the short path would
    skip the wrapper, so the ordinary call runs while it is there."""
    import functools

    seen: list[str] = []
    original = dspy.Predict.forward

    @functools.wraps(original)
    def traced(self: Any, **kwargs: Any) -> Any:
        seen.append("forward")
        return original(self, **kwargs)

    plain = dspy.Predict("q -> a")
    assert short_path(plain) is not None
    monkeypatch.setattr(dspy.Predict, "forward", traced)
    assert short_path(plain) is None
    with dspy.context(lm=ScriptedLM(["[[ ## a ## ]]\nok\n\n[[ ## completed ## ]]"])):
        assert call_predictor(plain, {"q": "x"}).a == "ok"
    assert seen == ["forward"]
    monkeypatch.undo()
    assert short_path(plain) is not None


def test_a_wrapt_wrapper_added_after_the_first_call_is_seen() -> None:
    """wrapt (what OpenInference uses) wraps ``Predict.forward`` after stages already ran: its
    wrapper compares equal to DSPy's function, so the check is by identity."""
    wrapt = pytest.importorskip("wrapt")
    seen: list[str] = []

    def traced(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        seen.append("forward")
        return wrapped(*args, **kwargs)

    plain = dspy.Predict("q -> a")
    script = ["[[ ## a ## ]]\nok\n\n[[ ## completed ## ]]"] * 2
    with dspy.context(lm=ScriptedLM(script)):
        call_predictor(plain, {"q": "x"})  # (the short path, remembered as DSPy's own)
        original = dspy.Predict.__dict__["forward"]
        wrapt.wrap_function_wrapper(dspy.Predict, "forward", traced)
        try:
            assert dspy.Predict.forward == original  # (why an == check would miss it)
            assert short_path(plain) is None
            assert call_predictor(plain, {"q": "x"}).a == "ok"
        finally:
            dspy.Predict.forward = original
    assert seen == ["forward"]
    assert short_path(plain) is not None


def test_pre_and_post_processing_set_on_an_instance_run() -> None:
    plain = dspy.Predict("q -> a")
    marks: list[str] = []
    original = dspy.Predict._forward_postprocess

    def postprocess(completions: Any, signature: Any, **kwargs: Any) -> Any:
        marks.append("post")
        return original(plain, completions, signature, **kwargs)

    plain._forward_postprocess = postprocess
    assert short_path(plain) is None
    with dspy.context(lm=ScriptedLM(["[[ ## a ## ]]\nok\n\n[[ ## completed ## ]]"])):
        assert call_predictor(plain, {"q": "x"}).a == "ok"
    assert marks == ["post"]
