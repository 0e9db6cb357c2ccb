"""RepairPolicy (ask again showing the validation error) and Fallback (a default output or another stage)."""

from __future__ import annotations

import threading
from typing import Any

import dspy
import pytest
from dspy.utils.exceptions import AdapterParseError

from stageflow import (
    ConfigurationError,
    ContractError,
    Fallback,
    RepairPolicy,
    RetryPolicy,
    SequentialPipeline,
    Stage,
    StageError,
    StageInput,
    StageOutput,
    StandardStage,
    stage,
)
from stageflow.testing import FakeLM, call


async def _no_wait(seconds: float) -> None:
    return None


def scripted(*values: Any) -> Any:
    """A FakeLM script returning ``values`` in turn (the last one repeats)."""
    queue = list(values)
    lock = threading.Lock()

    def next_value(inputs: dict[str, Any]) -> Any:
        with lock:
            return queue.pop(0) if len(queue) > 1 else queue[0]

    return next_value


def user_prompt(lm: FakeLM, i: int) -> str:
    return str(lm.history[i]["messages"][-1]["content"])


# -- repair of LM output -----------------------------------------------------------------------------


async def test_repair_asks_again_with_the_validation_error(mode: str) -> None:
    lm = FakeLM({"n": scripted("seven", 7)})
    p = SequentialPipeline([Stage(dspy.Predict("question -> n: int"), repair=True)])
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        r = await call(p, mode, question="how many?")
    assert r.n == 7
    assert lm.calls == 2
    repairs = [e for e in r.run.events if e.kind == "repair"]
    assert len(repairs) == 1
    assert repairs[0].stage == "stages[0]"
    assert repairs[0].attempt == 1
    assert repairs[0].error.startswith("AdapterParseError")
    first, second = user_prompt(lm, 0), user_prompt(lm, 1)
    assert "could not be used" not in first
    assert "Your previous answer could not be used" in second
    assert "seven" in second
    assert "valid integer" in second
    # same inputs both times
    assert lm.log[0][1] == lm.log[1][1] == {"question": "how many?"}


async def test_repairs_are_bounded_and_the_error_propagates(mode: str) -> None:
    lm = FakeLM({"n": "seven"})
    p = SequentialPipeline([Stage(dspy.Predict("question -> n: int"), repair=RepairPolicy(max_repairs=1))])
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()), pytest.raises(StageError) as info:
        await call(p, mode, question="how many?")
    assert lm.calls == 2
    assert isinstance(info.value.__cause__, AdapterParseError)
    assert info.value.stage_path == "stages[0]"


def test_repair_count_as_int() -> None:
    lm = FakeLM({"n": "seven"})
    p = SequentialPipeline([Stage(dspy.Predict("question -> n: int"), repair=3)])
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()), pytest.raises(StageError):
        p(question="q")
    assert lm.calls == 4


def test_without_repair_a_parse_error_fails_at_once() -> None:
    lm = FakeLM({"n": scripted("seven", 7)})
    p = SequentialPipeline([dspy.Predict("question -> n: int")])
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()), pytest.raises(StageError):
        p(question="q")
    assert lm.calls == 1


def test_repair_feedback_is_only_added_to_the_repair_call() -> None:
    lm = FakeLM({"n": scripted("seven", 7, 8)})
    p = SequentialPipeline([Stage(dspy.Predict("question -> n: int"), repair=True)])
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        assert p(question="a").n == 7
        r = p(question="b")
    assert r.n == 8
    assert r.run.events == []
    assert "could not be used" not in user_prompt(lm, 2)


def test_repair_keeps_the_active_adapter_type() -> None:
    seen: list[type] = []

    class Spy(dspy.JSONAdapter):
        def format(self, signature: Any, demos: Any, inputs: Any) -> Any:
            seen.append(type(self))
            return super().format(signature, demos, inputs)

    lm = FakeLM({"n": scripted("seven", 7)})
    p = SequentialPipeline([Stage(dspy.Predict("question -> n: int"), repair=True)])
    with dspy.context(lm=lm, adapter=Spy()):
        assert p(question="q").n == 7
    assert len(seen) == 2
    assert seen[0] is Spy
    assert issubclass(seen[1], Spy)  # the repair adapter subclasses the active one


async def test_retries_and_repairs_are_counted_separately(mode: str) -> None:
    # A transient failure, then an invalid answer, then a valid one.
    state = {"n": 0}

    def n_script(inputs: dict[str, Any]) -> Any:
        state["n"] += 1
        return "seven" if state["n"] == 1 else 7

    lm = FakeLM({"n": n_script}, fail_times=1)
    retry = RetryPolicy(
        max_attempts=2, retry_on=lambda e: "scripted failure" in str(e), sleep=lambda s: None, asleep=_no_wait
    )
    p = SequentialPipeline([Stage(dspy.Predict("question -> n: int"), retry=retry, repair=1)])
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        r = await call(p, mode, question="q")
    assert r.n == 7
    assert lm.calls == 3
    assert [e.kind for e in r.run.events] == ["retry", "repair"]


# -- repair of StandardStage output --------------------------------------------------------------------


class CountIn(StageInput):
    text: str


class CountOut(StageOutput):
    n: int


class FlakyCounter(StandardStage):
    input_model, output_model = CountIn, CountOut

    def __init__(self, bad: int) -> None:
        super().__init__()
        self.bad = bad
        self.calls = 0

    def process(self, data: CountIn) -> Any:
        self.calls += 1
        if self.calls <= self.bad:
            return {"content": data.text, "confidence": 1.0, "n": "seven"}
        return {"content": data.text, "confidence": 1.0, "n": len(data.text)}


async def test_standard_stage_invalid_output_is_repairable(mode: str) -> None:
    s = FlakyCounter(bad=1)
    p = SequentialPipeline([Stage(s, repair=True)])
    r = await call(p, mode, content="c", text="abcd")
    assert r.n == 4
    assert s.calls == 2
    assert [(e.kind, e.error.split(":")[0]) for e in r.run.events] == [("repair", "ContractError")]


async def test_standard_stage_invalid_output_without_repair_fails(mode: str) -> None:
    s = FlakyCounter(bad=1)
    with pytest.raises(ContractError) as info:
        await call(SequentialPipeline([s]), mode, content="c", text="abcd")
    assert info.value.code == "invalid_output"
    assert s.calls == 1


def test_standard_stage_repairs_are_bounded() -> None:
    s = FlakyCounter(bad=10)
    with pytest.raises(ContractError) as info:
        SequentialPipeline([Stage(s, repair=2)])(content="c", text="abcd")
    assert info.value.code == "invalid_output"
    assert s.calls == 3


def test_errors_that_are_not_contract_failures_are_not_repaired() -> None:
    n = {"calls": 0}

    def body(x: str) -> dict[str, Any]:
        n["calls"] += 1
        raise ValueError("not a contract failure")

    with pytest.raises(StageError):
        SequentialPipeline([Stage(stage(body, writes=["y"]), repair=5)])(x="in")
    assert n["calls"] == 1


def test_missing_declared_output_is_repairable() -> None:
    n = {"calls": 0}

    def body(x: str) -> dict[str, Any]:
        n["calls"] += 1
        return {} if n["calls"] == 1 else {"y": x}

    r = SequentialPipeline([Stage(stage(body, writes=["y"]), repair=True)])(x="in")
    assert r.y == "in"
    assert [e.kind for e in r.run.events] == ["repair"]


def test_invalid_repair_options_raise_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        RepairPolicy(max_repairs=-1)


# -- fallback: a default output ------------------------------------------------------------------------


def failing(error: Exception, out: str = "answer") -> tuple[Any, list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def body(question: str) -> dict[str, Any]:
        seen.append({"question": question})
        raise error

    return stage(body, writes=[out]), seen


async def test_fallback_default_replaces_a_failed_stage(mode: str) -> None:
    body, seen = failing(ValueError("nope"))
    p = SequentialPipeline(
        [Stage(body, fallback=Fallback(default={"answer": "unknown"})), lambda answer: {"len": len(answer)}]
    )
    r = await call(p, mode, question="q")
    assert r.answer == "unknown"
    assert r.len == 7
    assert [(e.kind, e.error) for e in r.run.events] == [("fallback", "ValueError: nope")]
    assert len(seen) == 1


def test_fallback_default_is_copied_per_run() -> None:
    body, _ = failing(ValueError("nope"))
    default = {"answer": "unknown"}
    p = SequentialPipeline([Stage(body, fallback=Fallback(default=default))])
    r1 = p(question="q")
    r1.stage_outputs["stages[0]"]["answer"] = "mutated"
    assert p(question="q").answer == "unknown"
    assert default == {"answer": "unknown"}


# -- fallback: another stage ---------------------------------------------------------------------------


def test_fallback_stage_is_a_named_predictor() -> None:
    fb = dspy.Predict("question -> answer")
    body, _ = failing(ConnectionError("down"))
    p = SequentialPipeline([Stage(body, fallback=fb)])
    assert dict(p.named_predictors()) == {"stages[0].fallback_stage": fb}
    p2 = SequentialPipeline([Stage(dspy.Predict("question -> answer"), fallback=Fallback(stage=fb))])
    assert [n for n, _ in p2.named_predictors()] == ["stages[0].module", "stages[0].fallback_stage"]
    assert p2.stages[0].fallback_stage is fb


async def test_fallback_stage_runs_after_retries_are_exhausted_with_the_same_inputs(mode: str) -> None:
    lm = FakeLM({"answer": lambda i: "fallback for " + i["question"]})
    fb = dspy.Predict("question -> answer")
    body, seen = failing(ConnectionError("down"))
    retry = RetryPolicy(max_attempts=3, sleep=lambda s: None, asleep=_no_wait)
    p = SequentialPipeline([Stage(body, retry=retry, fallback=fb)])
    with dspy.context(lm=lm):
        r = await call(p, mode, question="why?")
    assert r.answer == "fallback for why?"
    assert len(seen) == 3
    assert lm.calls == 1
    assert lm.log[0][1] == {"question": "why?"}
    assert [e.kind for e in r.run.events] == ["retry", "retry", "fallback"]


async def test_fallback_predict_for_a_failing_predict(mode: str) -> None:
    broken = FakeLM({"answer": "never"}, fail_times=100)
    good = FakeLM({"answer": lambda i: "good: " + i["question"]})
    primary = dspy.Predict("question -> answer")
    primary.lm = broken
    fb = dspy.Predict("question -> answer")
    fb.lm = good
    p = SequentialPipeline(
        [Stage(primary, inputs={"question": "query"}, outputs={"answer": "draft"}, fallback=fb)]
    )
    r = await call(p, mode, query="hi")
    assert r.draft == "good: hi"
    assert broken.calls == 1
    assert good.log == [(("answer",), {"question": "hi"})]


async def test_fallback_is_not_called_when_the_stage_succeeds(mode: str) -> None:
    calls: list[str] = []
    p = SequentialPipeline(
        [Stage(lambda x: {"y": x}, writes=["y"], fallback=lambda x: calls.append(x) or {"y": "fb"})]
    )
    r = await call(p, mode, x="a")
    assert r.y == "a"
    assert calls == []


def test_a_failing_fallback_stage_names_both_errors_and_keeps_the_original_as_cause() -> None:
    body, _ = failing(ValueError("primary"))

    def fb(question: str) -> dict[str, Any]:
        raise KeyError("fallback too")

    with pytest.raises(StageError) as info:
        SequentialPipeline([Stage(body, fallback=fb)])(question="q")
    assert info.value.code == "fallback_failed"
    assert isinstance(info.value.__cause__, ValueError)
    assert isinstance(info.value.__context__, KeyError)
    assert "ValueError: primary" in str(info.value)
    assert "KeyError: 'fallback too'" in str(info.value)


def test_copied_pipeline_uses_its_own_fallback_stage() -> None:
    lm_orig = FakeLM({"answer": "original"})
    lm_copy = FakeLM({"answer": "copy"})
    fb = dspy.Predict("question -> answer")
    fb.lm = lm_orig
    body, _ = failing(ValueError("x"))
    p = SequentialPipeline([Stage(body, fallback=fb)])
    cp = p.deepcopy()
    assert cp.stages[0].fallback_stage is not fb
    cp.stages[0].fallback_stage.lm = lm_copy
    assert cp(question="q").answer == "copy"
    assert p(question="q").answer == "original"


def test_fallback_stage_in_a_compiled_program_gets_demos() -> None:
    lm = FakeLM({"answer": "4"})
    body, _ = failing(ValueError("x"))
    program = SequentialPipeline([Stage(body, fallback=dspy.Predict("question -> answer"))])
    train = [dspy.Example(question=f"q{i}", answer="4").with_inputs("question") for i in range(3)]
    opt = dspy.BootstrapFewShot(
        metric=lambda ex, pred, trace=None: pred.answer == ex.answer, max_labeled_demos=0
    )
    with dspy.context(lm=lm):
        compiled = opt.compile(program, trainset=train)
    demos = dict(compiled.named_predictors())["stages[0].fallback_stage"].demos
    assert len(demos) == 3
