"""Pipeline defaults: ``set_defaults`` reaches every leaf stage; a stage's own policy of a kind wins."""

from __future__ import annotations

import threading
import time
from typing import Any

import dspy
import pytest

from sleeps_kit import Sleeps
from stageflow import (
    ConfigurationError,
    Fallback,
    ParallelPipeline,
    RetryPolicy,
    SequentialPipeline,
    Stage,
    StageError,
    StageTimeoutError,
    stage,
)
from stageflow.testing import FakeLM, call


class Waits(Sleeps):
    def policy(self, **kw: Any) -> RetryPolicy:
        return RetryPolicy(sleep=self.sleep, asleep=self.asleep, **kw)


def fails_once(inp: str, out: str, error: type[Exception] = ConnectionError) -> tuple[Any, list[int]]:
    calls: list[int] = []
    lock = threading.Lock()

    def body(**kw: Any) -> dict[str, Any]:
        with lock:
            calls.append(1)
            n = len(calls)
        if n == 1:
            raise error(f"{out} failed once")
        return {out: f"{out}({kw[inp]})"}

    return stage(body, reads=[inp], writes=[out], name=out), calls


async def test_default_retry_applies_to_every_leaf_stage(mode: str) -> None:
    waits = Waits()
    a, ca = fails_once("x", "a")
    b, cb = fails_once("a", "b")
    p = SequentialPipeline([a, b]).set_defaults(retry=waits.policy(max_attempts=2))
    r = await call(p, mode, x="in")
    assert r.b == "b(a(in))"
    assert len(ca) == 2
    assert len(cb) == 2
    assert [(e.stage, e.kind) for e in r.run.events] == [("stages[0]", "retry"), ("stages[1]", "retry")]
    assert len(waits.delays) == 2


async def test_default_retry_applies_to_predict_stages(mode: str) -> None:
    lm = FakeLM({"answer": "A"}, fail_times=1)
    p = SequentialPipeline([dspy.Predict("question -> answer")])
    p.set_defaults(retry=RetryPolicy(retry_on=lambda e: True, sleep=lambda s: None, asleep=_no_wait))
    with dspy.context(lm=lm):
        r = await call(p, mode, question="q")
    assert r.answer == "A"
    assert lm.calls == 2


async def _no_wait(seconds: float) -> None:
    return None


def test_set_defaults_returns_the_pipeline_and_accepts_friendly_values() -> None:
    p = SequentialPipeline([lambda x: {"y": x}])
    assert p.set_defaults(retry=3, timeout=2.5, repair=True, cache=10) is p
    d = p._default_policy
    assert d.retry.max_attempts == 3
    assert d.timeout.seconds == 2.5
    assert d.repair is not None
    assert d.cache.memory.maxsize == 10


async def test_default_timeout_applies_to_every_leaf_stage(mode: str) -> None:
    def slow(x: str) -> dict[str, Any]:
        time.sleep(0.5)
        return {"y": x}

    p = SequentialPipeline([lambda x: {"x2": x}, stage(slow, writes=["y"])]).set_defaults(timeout=0.05)
    with pytest.raises(StageTimeoutError) as info:
        await call(p, mode, x="in")
    assert info.value.stage_path == "stages[1]"


async def test_a_stages_own_policy_of_a_kind_wins(mode: str) -> None:
    default_waits, own_waits = Waits(), Waits()
    a, _ca = fails_once("x", "a")
    b, _cb = fails_once("a", "b")
    p = SequentialPipeline([a, Stage(b, retry=own_waits.policy(max_attempts=2, initial_delay=9.0, jitter=0))])
    p.set_defaults(retry=default_waits.policy(max_attempts=2, initial_delay=1.0, jitter=0))
    r = await call(p, mode, x="in")
    assert r.b == "b(a(in))"
    assert default_waits.delays == [1.0]
    assert own_waits.delays == [9.0]


async def test_own_policy_wins_only_for_its_kind(mode: str) -> None:
    # The stage sets its own timeout; the default retry still applies to it.
    waits = Waits()
    a, ca = fails_once("x", "a")
    p = SequentialPipeline([Stage(a, timeout=5)]).set_defaults(
        retry=waits.policy(max_attempts=2), timeout=0.001
    )
    r = await call(p, mode, x="in")
    assert r.a == "a(in)"
    assert len(ca) == 2
    assert [e.kind for e in r.run.events] == ["retry"]


def test_own_stricter_policy_overrides_a_generous_default() -> None:
    waits = Waits()
    a, ca = fails_once("x", "a")
    p = SequentialPipeline([Stage(a, retry=RetryPolicy(max_attempts=1))]).set_defaults(
        retry=waits.policy(max_attempts=5)
    )
    with pytest.raises(StageError):
        p(x="in")
    assert len(ca) == 1
    assert waits.delays == []


async def test_default_fallback_default_applies_to_each_stage(mode: str) -> None:
    def boom(**kw: Any) -> dict[str, Any]:
        raise ValueError("boom")

    p = SequentialPipeline([stage(boom, reads=["x"], writes=["y"])]).set_defaults(
        fallback=Fallback(default={"y": "default"})
    )
    r = await call(p, mode, x="in")
    assert r.y == "default"
    assert [e.kind for e in r.run.events] == ["fallback"]


def test_fallback_stage_in_set_defaults_is_rejected() -> None:
    p = SequentialPipeline([lambda x: {"y": x}])
    with pytest.raises(ConfigurationError) as info:
        p.set_defaults(fallback=Fallback(stage=dspy.Predict("x -> y")))
    assert info.value.field == "fallback"
    with pytest.raises(ConfigurationError):
        p.set_defaults(fallback=dspy.Predict("x -> y"))
    with pytest.raises(ConfigurationError):
        p.set_defaults(fallback=lambda x: {"y": x})


def test_invalid_defaults_raise_configuration_error() -> None:
    p = SequentialPipeline([lambda x: {"y": x}])
    with pytest.raises(ConfigurationError):
        p.set_defaults(retry="often")
    with pytest.raises(ConfigurationError):
        p.set_defaults(timeout=-1)


def test_set_defaults_again_replaces_the_previous_defaults() -> None:
    waits = Waits()
    a, ca = fails_once("x", "a")
    p = SequentialPipeline([a]).set_defaults(retry=waits.policy(max_attempts=2))
    p.set_defaults()
    with pytest.raises(StageError):
        p(x="in")
    assert len(ca) == 1


def test_defaults_set_after_a_first_run_apply_to_later_runs() -> None:
    waits = Waits()
    a, _ca = fails_once("x", "a", error=ConnectionError)
    p = SequentialPipeline([Stage(a, timeout=5)])
    with pytest.raises(StageError):
        p(x="in")
    p.set_defaults(retry=waits.policy(max_attempts=2))
    assert p(x="in").a == "a(in)"


async def test_parallel_pipeline_defaults_reach_each_branch(mode: str) -> None:
    waits = Waits()
    a, _ca = fails_once("x", "a")
    b, _cb = fails_once("x", "b")
    p = ParallelPipeline([a, b]).set_defaults(retry=waits.policy(max_attempts=2))
    r = await call(p, mode, x="in")
    assert (r.a, r.b) == ("a(in)", "b(in)")
    assert sorted(e.kind for e in r.run.events) == ["retry", "retry"]


def test_defaults_reach_leaf_stages_of_a_nested_pipeline() -> None:
    waits = Waits()
    a, _ca = fails_once("x", "a")
    inner = SequentialPipeline([a])
    outer = SequentialPipeline([lambda x: {"z": x}, inner]).set_defaults(retry=waits.policy(max_attempts=2))
    r = outer(x="in")
    assert r.a == "a(in)"
    assert [(e.stage, e.kind) for e in r.run.events] == [("stages[1].stages[0]", "retry")]


def test_a_nested_pipeline_is_not_retried_as_a_whole() -> None:
    # Defaults apply to leaf stages, not to a composite stage: the inner pipeline's first (successful)
    # stage must not run again because its second stage failed.
    first_calls: list[str] = []

    def first(x: str) -> dict[str, Any]:
        first_calls.append(x)
        return {"a": x}

    def always_fails(a: str) -> dict[str, Any]:
        raise ConnectionError("down")

    inner = SequentialPipeline([stage(first, writes=["a"]), stage(always_fails, writes=["b"])])
    outer = SequentialPipeline([inner]).set_defaults(retry=RetryPolicy(max_attempts=3, sleep=lambda s: None))
    with pytest.raises(StageError):
        outer(x="in")
    assert first_calls == ["in"]


def test_own_policy_still_wins_after_add_stage_renumbers_the_stages() -> None:
    n = {"calls": 0}

    def second_call_fails(x: str) -> dict[str, Any]:
        n["calls"] += 1
        if n["calls"] == 2:
            raise ConnectionError("down")
        return {"a": x}

    p = SequentialPipeline(
        [
            Stage(stage(second_call_fails, writes=["a"]), retry=RetryPolicy(max_attempts=1)),
            Stage(lambda a: {"b": a}, writes=["b"], timeout=5),
        ]
    ).set_defaults(retry=RetryPolicy(max_attempts=3, sleep=lambda s: None))
    assert p(x="in").b == "in"
    p.add_stage(Stage(lambda x: {"w": x}, writes=["w"], timeout=5), position=0)
    with pytest.raises(StageError):  # its own max_attempts=1: no retry
        p(x="in")


async def test_a_default_output_mapping_is_taken_as_stage_takes_it(mode: str) -> None:
    # (helper 91: Stage(x, fallback={...}) took a dict, set_defaults(fallback={...}) refused it)
    def boom(x: str) -> dict[str, str]:
        raise RuntimeError("down")

    p = SequentialPipeline([stage(boom, reads=["x"], writes=["y"])]).set_defaults(fallback={"y": "default"})
    r = await call(p, mode, x="in")
    assert r.y == "default"
    assert [e.kind for e in r.run.events] == ["fallback"]


async def test_a_default_output_is_each_calls_own(mode: str) -> None:
    # (helper 92, D1/D2: a later stage's change to a default list built up across calls, and the
    # caller's dict changed after it was given changed the default)
    def failing(q: str) -> dict[str, Any]:
        raise ValueError("down")

    def appender(ys: list[str]) -> dict[str, Any]:
        ys.append("added")
        return {"n": len(ys)}

    given: dict[str, Any] = {"ys": []}
    p = SequentialPipeline(
        [stage(failing, reads=["q"], writes=["ys"]), stage(appender, reads=["ys"], writes=["n"])]
    ).set_defaults(fallback=given)
    given["ys"] = ["changed after it was given"]
    counts = [(await call(p, mode, q="x")).n for _ in range(3)]
    assert counts == [1, 1, 1]


def test_a_default_is_taken_as_it_was_given_all_the_way_down() -> None:
    # (helper 93: a nested list of yours changed after it was given changed the default, and the
    # pipeline's fingerprint did not follow)
    from stageflow import Stage, fingerprint

    given: dict[str, Any] = {"tags": ["a"]}

    def failing(q: int) -> dict[str, Any]:
        raise ValueError("down")

    p = SequentialPipeline([Stage(failing, writes=["tags"], fallback=given)])
    before = fingerprint(p)
    given["tags"].append("late")
    assert p(q=1).tags == ["a"]
    assert fingerprint(p) == before


def test_a_stage_alone_answers_its_fallback_default_as_its_module_answers() -> None:
    # (helper 93: a module's Stage called alone gave a dict on fallback, a Prediction otherwise)
    import time

    from stageflow import Stage

    class Slow(dspy.Module):
        def forward(self, question: str) -> dspy.Prediction:
            time.sleep(0.3)
            return dspy.Prediction(answer="late")

    out = Stage(Slow(), timeout=0.05, fallback={"answer": "fallback"})(question="q")
    assert isinstance(out, dspy.Prediction)
    assert out.answer == "fallback"
    assert Stage(stage(lambda q: 1 / 0, writes=["a"]), fallback={"a": 1})(q=1) == {"a": 1}
