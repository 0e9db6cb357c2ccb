"""Lazy evaluation (LazyStage / LazyResult) and demand-driven runs (``pipeline(..., outputs=[...])``)."""

from __future__ import annotations

import threading
import time
from typing import Any

import dspy
import pytest

from stageflow import (
    ConfigurationError,
    ContractError,
    LazyResult,
    LazyStage,
    SequentialPipeline,
    Stage,
    stage,
)
from stageflow.testing import FakeLM


async def call(p: Any, mode: str, outputs: Any = None, **inputs: Any) -> Any:
    if mode == "sync":
        return p(outputs=outputs, **inputs)
    return await p.acall(outputs=outputs, **inputs)


class Recorder:
    def __init__(self, delay: float = 0.0) -> None:
        self.calls: list[dict[str, Any]] = []
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, x: int) -> dict[str, Any]:
        with self._lock:
            self.calls.append({"x": x})
        if self.delay:
            time.sleep(self.delay)
        return {"y": x * 10, "items": [x, x + 1]}


# -- LazyStage -----------------------------------------------------------------------------------


def test_calling_a_lazy_stage_does_not_run_it() -> None:
    rec = Recorder()
    r = LazyStage(rec)(x=4)
    assert isinstance(r, LazyResult)
    assert rec.calls == []
    assert not r.done
    assert "pending" in repr(r)


def test_first_access_runs_it_once_and_delegates() -> None:
    rec = Recorder()
    r = LazyStage(rec)(x=4)
    assert r["y"] == 40
    assert r["items"] == [4, 5]
    assert r.value() == {"y": 40, "items": [4, 5]}
    assert r.done
    assert rec.calls == [{"x": 4}]
    assert repr(r) == repr({"y": 40, "items": [4, 5]})


def test_attribute_access_is_delegated_to_a_pipeline_result() -> None:
    lm = FakeLM({"answer": lambda i: "A:" + i["question"]})
    p = SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=lm):
        r = LazyStage(p)(question="q")
        assert lm.calls == 0
        assert r.answer == "A:q"
        assert r["answer"] == "A:q"
        assert r.run.trace[0].path == "stages[0]"
        assert r.keys() == ["question", "answer"]
    assert lm.calls == 1


def test_attribute_errors_come_from_the_real_result() -> None:
    r = LazyStage(Recorder())(x=1)
    with pytest.raises(AttributeError):
        _ = r.no_such_attribute
    with pytest.raises(KeyError):
        _ = r["no_such_key"]


def test_lazy_result_is_read_only() -> None:
    r = LazyStage(Recorder())(x=1)
    with pytest.raises(AttributeError):
        r.y = 3  # type: ignore[misc]


def test_runs_exactly_once_under_concurrent_access() -> None:
    rec = Recorder(delay=0.05)
    r = LazyStage(rec)(x=2)
    n = 16
    barrier = threading.Barrier(n)
    seen: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def reader(i: int) -> None:
        try:
            barrier.wait()
            value = r["y"] if i % 2 else r.value()["y"]
            with lock:
                seen.append(value)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert seen == [20] * n
    assert len(rec.calls) == 1


def test_errors_are_re_raised_on_each_access_without_rerunning() -> None:
    calls: list[int] = []

    def boom(x: int) -> dict[str, Any]:
        calls.append(x)
        raise ValueError(f"bad {x}")

    r = LazyStage(boom)(x=3)
    for _ in range(3):
        with pytest.raises(ValueError, match="bad 3"):
            _ = r["y"]
    with pytest.raises(ValueError):
        r.value()
    assert calls == [3]
    assert r.done


def test_dspy_context_of_the_call_applies_when_resolved() -> None:
    lm_call = FakeLM({"answer": "from call-time lm"})
    lm_later = FakeLM({"answer": "from access-time lm"})
    p = SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=lm_call):
        r = LazyStage(p)(question="q")
    with dspy.context(lm=lm_later):
        assert r.answer == "from call-time lm"
    assert (lm_call.calls, lm_later.calls) == (1, 0)


def test_context_applies_when_resolved_on_another_thread() -> None:
    lm = FakeLM({"answer": "ok"})
    p = SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=lm):
        r = LazyStage(p)(question="q")
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(r.answer))
    t.start()
    t.join()
    assert out == ["ok"]
    assert lm.calls == 1


def test_each_call_of_a_lazy_stage_is_independent() -> None:
    rec = Recorder()
    lazy = LazyStage(rec)
    a, b = lazy(x=1), lazy(x=2)
    assert b["y"] == 20
    assert rec.calls == [{"x": 2}]
    assert a["y"] == 10
    assert rec.calls == [{"x": 2}, {"x": 1}]


def test_unread_lazy_result_never_runs() -> None:
    rec = Recorder()
    LazyStage(rec)(x=1)
    assert rec.calls == []


def test_lazy_stage_needs_a_callable() -> None:
    with pytest.raises(ConfigurationError):
        LazyStage("not a stage")


async def test_lazy_result_resolved_from_async_code() -> None:
    lm = FakeLM({"answer": "ok"})
    p = SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=lm):
        r = LazyStage(p)(question="q")
    assert r.answer == "ok"


# -- demand-driven runs -----------------------------------------------------------------------------


def branchy() -> SequentialPipeline:
    """question -> keywords -> summary;  question -> title;  title + summary -> report."""
    return SequentialPipeline(
        [
            dspy.Predict("question -> keywords"),
            dspy.Predict("question -> title"),
            dspy.Predict("keywords -> summary"),
            dspy.Predict("title, summary -> report"),
        ]
    )


SCRIPT = {"keywords": "k", "title": "T", "summary": "S", "report": "R"}


async def test_only_the_stages_a_requested_field_depends_on_run(mode: str) -> None:
    lm = FakeLM(SCRIPT)
    p = branchy()
    with dspy.context(lm=lm):
        r = await call(p, mode, outputs=["title"], question="q")
    assert lm.calls == 1
    assert [o for o, _ in lm.log] == [("title",)]
    assert r.title == "T"
    assert "keywords" not in r
    assert "summary" not in r
    assert "report" not in r
    assert r.skipped_stages == ["stages[0]", "stages[2]", "stages[3]"]
    assert [t.path for t in r.trace] == ["stages[1]"]


async def test_transitive_dependencies_run(mode: str) -> None:
    lm = FakeLM(SCRIPT)
    with dspy.context(lm=lm):
        r = await call(branchy(), mode, outputs=["summary"], question="q")
    assert lm.calls == 2
    assert r.summary == "S"
    assert r.skipped_stages == ["stages[1]", "stages[3]"]


async def test_requesting_the_last_field_runs_everything(mode: str) -> None:
    lm = FakeLM(SCRIPT)
    with dspy.context(lm=lm):
        r = await call(branchy(), mode, outputs=["report"], question="q")
    assert lm.calls == 4
    assert r.skipped_stages == []


async def test_several_outputs_and_a_single_string(mode: str) -> None:
    lm = FakeLM(SCRIPT)
    p = branchy()
    with dspy.context(lm=lm):
        r = await call(p, mode, outputs=["title", "keywords"], question="q")
        r2 = await call(p, mode, outputs="title", question="q")
    assert (r.title, r.keywords) == ("T", "k")
    assert r.skipped_stages == ["stages[2]", "stages[3]"]
    assert r2.skipped_stages == ["stages[0]", "stages[2]", "stages[3]"]
    assert lm.calls == 3


async def test_unknown_requested_output_is_a_contract_error(mode: str) -> None:
    lm = FakeLM(SCRIPT)
    with dspy.context(lm=lm), pytest.raises(ContractError) as info:
        await call(branchy(), mode, outputs=["tittle"], question="q")
    assert info.value.code == "unknown_output"
    assert info.value.field == "tittle"
    assert "title" in str(info.value)
    assert lm.calls == 0


async def test_missing_input_for_the_requested_branch_is_a_contract_error(mode: str) -> None:
    p = SequentialPipeline([dspy.Predict("question -> title"), dspy.Predict("context -> summary")])
    lm = FakeLM(SCRIPT)
    with dspy.context(lm=lm):
        assert (await call(p, mode, outputs=["title"], question="q")).title == "T"
        with pytest.raises(ContractError):
            await call(p, mode, outputs=["summary"], question="q")
    assert lm.calls == 1


def test_requesting_an_input_runs_nothing() -> None:
    lm = FakeLM(SCRIPT)
    with dspy.context(lm=lm):
        r = branchy()(outputs=["question"], question="q")
    assert lm.calls == 0
    assert r.question == "q"
    assert len(r.skipped_stages) == 4


def test_without_outputs_everything_runs() -> None:
    lm = FakeLM(SCRIPT)
    with dspy.context(lm=lm):
        r = branchy()(question="q")
    assert lm.calls == 4
    assert "skipped_stages" not in r.run.extras


def test_stages_with_undeclared_outputs_are_always_run() -> None:
    ran: list[str] = []

    def opaque(question: str) -> dict[str, Any]:
        ran.append(question)
        return {"extra": 1}

    p = SequentialPipeline(
        [stage(opaque), dspy.Predict("question -> title"), dspy.Predict("question -> keywords")]
    )
    lm = FakeLM(SCRIPT)
    with dspy.context(lm=lm):
        r = p(outputs=["title"], question="q")
    assert ran == ["q"]  # it might produce anything, so it is kept
    assert r.skipped_stages == ["stages[2]"]
    assert lm.calls == 1


def test_renamed_outputs_are_followed() -> None:
    p = SequentialPipeline(
        [
            Stage(dspy.Predict("question -> answer"), outputs={"answer": "draft"}),
            dspy.Predict("question -> title"),
            Stage(dspy.Predict("text -> answer"), inputs={"text": "draft"}),
        ]
    )
    lm = FakeLM({"answer": "A", "title": "T"})
    with dspy.context(lm=lm):
        r = p(outputs=["answer"], question="q")
    assert r.skipped_stages == ["stages[1]"]
    assert lm.calls == 2


def test_policies_still_apply_in_demand_driven_runs() -> None:
    lm = FakeLM({"title": "T"})
    p = SequentialPipeline(
        [dspy.Predict("question -> keywords"), Stage(dspy.Predict("question -> title"), cache=True)]
    )
    with dspy.context(lm=lm):
        p(outputs=["title"], question="q")
        r = p(outputs=["title"], question="q")
    assert lm.calls == 1
    assert [e.kind for e in r.run.events] == ["cache_hit"]


def test_a_lazy_demand_driven_run() -> None:
    lm = FakeLM(SCRIPT)
    p = branchy()
    with dspy.context(lm=lm):
        r = LazyStage(p)(question="q", outputs=["title"])
    assert lm.calls == 0
    assert r.title == "T"
    assert lm.calls == 1
