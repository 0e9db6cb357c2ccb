"""More outputs a cache must never keep, because they are not the answer the stage gives when all
is well (user and attack checks, session 22): a budget's degradation inside the cached call (a
cheaper LM, a skipped stage, fewer ensemble members), an item ``dspy.Parallel`` gave up on, and a
``StandardStage`` result that reports an error."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow import CachedStage, Degrade, EnsemblePipeline, ResultAggregator, SequentialPipeline, Stage
from stageflow.testing import FakeLM, call


async def test_an_answer_from_the_degraded_lm_is_not_cached(mode: str) -> None:
    strong = FakeLM({"draft": "d", "answer": "STRONG"}, model="fake/strong", cost=0.03)
    cheap = FakeLM({"draft": "d", "answer": "cheap"}, model="fake/cheap", cost=0.001)
    inner = SequentialPipeline([dspy.Predict("question -> draft"), dspy.Predict("question, draft -> answer")])
    p = SequentialPipeline([CachedStage(inner)])
    with dspy.context(lm=strong), stageflow.budget(max_cost=0.05, degrade=Degrade(at=0.5, lm=cheap)):
        first = await call(p, mode, question="q")
    assert first.answer == "cheap"
    with dspy.context(lm=strong):
        again = await call(p, mode, question="q")
    assert again.answer == "STRONG"
    with dspy.context(lm=strong):
        third = await call(p, mode, question="q")
    assert third.run.usage.total.cache_hits == 1  # (the full answer is cached)


async def test_an_output_without_a_skipped_stage_is_not_cached(mode: str) -> None:
    lm = FakeLM({"draft": "d", "answer": "THE ANSWER"}, cost=0.03)
    inner = SequentialPipeline([dspy.Predict("question -> draft"), dspy.Predict("question -> answer")])
    p = SequentialPipeline([CachedStage(inner)])
    with dspy.context(lm=lm), stageflow.budget(max_cost=0.05, degrade=Degrade(at=0.5, skip=["*stages[1]"])):
        first = await call(p, mode, question="q")
    assert "answer" not in first
    with dspy.context(lm=lm):
        again = await call(p, mode, question="q")
    assert again.answer == "THE ANSWER"


async def test_an_ensemble_cut_to_fewer_members_is_not_cached(mode: str) -> None:
    def member(answer: str, name: str) -> dspy.Predict:
        predictor = dspy.Predict("question -> answer")
        predictor.lm = FakeLM({"answer": answer}, model=f"fake/{name}", cost=0.01)
        return predictor

    ensemble = EnsemblePipeline(
        [member("Lyon", "m1"), member("Paris", "m2"), member("Paris", "m3")], ResultAggregator("majority")
    )
    lm = FakeLM({"draft": "d"}, model="fake/s", cost=0.01)
    p = SequentialPipeline([dspy.Predict("question -> draft"), CachedStage(ensemble)])
    with dspy.context(lm=lm), stageflow.budget(max_cost=0.1, degrade=Degrade(at=0.05, max_members=1)):
        first = await call(p, mode, question="Capital of France?")
    assert first.answer == "Lyon"
    with dspy.context(lm=lm):
        again = await call(p, mode, question="Capital of France?")
    assert again.answer == "Paris"


def test_an_item_dspy_parallel_gave_up_on_is_not_cached() -> None:
    down = stageflow.untracked({"v": True})

    def f(x: int) -> dict[str, int]:
        if down["v"]:
            raise ConnectionError("down")
        return {"y": x}

    inner = stageflow.stage(f, writes=["y"])

    class Fans(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: int) -> dict[str, Any]:
            outs = dspy.Parallel(num_threads=2, disable_progress_bar=True)([(self.inner, {"x": x})])
            return {"y": outs[0]}

    cached = CachedStage(Fans(), writes=["y"])
    assert cached(x=1) == {"y": None}
    down["v"] = False
    assert cached(x=1) == {"y": {"y": 1}}
    assert cached(x=1) == {"y": {"y": 1}}


class Flaky(stageflow.StandardStage):
    down = stageflow.untracked({"v": True})

    def process(self, input_data: Any) -> dict[str, Any]:
        if self.down["v"]:
            raise ConnectionError("svc down")
        return {"content": input_data.content.upper(), "confidence": 1.0}


@pytest.mark.parametrize("wrap", ["CachedStage", "Stage(cache=True)"])
async def test_a_standard_stage_reporting_an_error_is_not_cached_on_its_own(mode: str, wrap: str) -> None:
    Flaky.down["v"] = True
    stage = CachedStage(Flaky()) if wrap == "CachedStage" else Stage(Flaky(), cache=True)
    first = await call(stage, mode, content="hi")
    assert "svc down" in first.error
    Flaky.down["v"] = False
    again = await call(stage, mode, content="hi")
    assert again.error is None
    assert again.content == "HI"


def retried_outer(fail_first_attempt: bool, inner_down_on_success: bool) -> tuple[Any, dict[str, Any]]:
    svc = stageflow.untracked({"down": True, "runs": 0})

    def flaky(x: int) -> dict[str, int]:
        if svc["down"]:
            raise ConnectionError("down")
        return {"y": x}

    inner = SequentialPipeline([Stage(stageflow.stage(flaky, writes=["y"]), fallback={"y": -1})])

    def outer(x: int) -> dict[str, Any]:
        svc["runs"] += 1
        result = inner(x=x)
        if svc["runs"] == 1 and fail_first_attempt:
            svc["down"] = inner_down_on_success
            raise ConnectionError("transient")
        return {"y": result.y}

    retry = stageflow.RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)
    pipeline = SequentialPipeline([Stage(stageflow.stage(outer, writes=["y"]), retry=retry, cache=True)])
    return pipeline, svc


async def test_a_healthy_retry_is_cached_though_a_failed_attempt_fell_back_inside(mode: str) -> None:
    pipeline, svc = retried_outer(fail_first_attempt=True, inner_down_on_success=False)
    assert (await call(pipeline, mode, x=1)).y == 1
    assert (await call(pipeline, mode, x=1)).y == 1
    assert svc["runs"] == 2  # (the second call is a hit)


async def test_a_retry_that_fell_back_inside_is_still_not_cached(mode: str) -> None:
    pipeline, svc = retried_outer(fail_first_attempt=True, inner_down_on_success=True)
    assert (await call(pipeline, mode, x=1)).y == -1
    svc["down"] = False
    assert (await call(pipeline, mode, x=1)).y == 1


async def test_fake_lms_with_other_scripts_do_not_share_cache_entries(mode: str) -> None:
    p = SequentialPipeline([CachedStage(dspy.Predict("question -> answer"))])
    with dspy.context(lm=FakeLM({"answer": "yes"})):
        assert (await call(p, mode, question="Is it raining?")).answer == "yes"
    with dspy.context(lm=FakeLM({"answer": "no"})):
        assert (await call(p, mode, question="Is it raining?")).answer == "no"
    with dspy.context(lm=FakeLM({"answer": lambda inputs: "maybe"})):
        assert (await call(p, mode, question="Is it raining?")).answer == "maybe"
    with dspy.context(lm=FakeLM({"answer": "yes"})):
        again = await call(p, mode, question="Is it raining?")
    assert again.answer == "yes"
    assert again.run.usage.total.cache_hits == 1
