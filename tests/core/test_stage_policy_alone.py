"""A Stage's policies are applied by the pipeline that runs it. Called where no pipeline applies
them (on its own, from a module's ``forward``, inside another ``Stage``), the stage used to run
without them silently: a per-stage budget of one call let three calls through. It now warns, once
per stage, naming the stage and the policies, at the caller's line."""

from __future__ import annotations

import warnings
from typing import Any

import dspy
import pytest

import stageflow
from stageflow.stages import PolicyNotAppliedWarning
from stageflow.testing import FakeLM


def _flaky(failures: int = 1) -> tuple[Any, list[int]]:
    calls: list[int] = stageflow.untracked([])  # (a call log: not part of a cache key)

    def flaky(x: int) -> dict[str, int]:
        calls.append(x)
        if len(calls) <= failures:
            raise ConnectionError("reset")
        return {"y": x}

    return flaky, calls


def _retry() -> stageflow.RetryPolicy:
    return stageflow.RetryPolicy(max_attempts=3, initial_delay=0, jitter=0)


async def _call(target: Any, mode: str, **kw: Any) -> Any:
    return target(**kw) if mode == "sync" else await target.acall(**kw)


async def test_a_stage_with_policies_called_on_its_own_warns_once_at_the_callers_line(mode: str) -> None:
    fn, _ = _flaky(failures=0)
    s = stageflow.Stage(fn, writes=["y"], retry=_retry(), timeout=5.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await _call(s, mode, x=1)
        await _call(s, mode, x=2)
    found = [w for w in caught if issubclass(w.category, PolicyNotAppliedWarning)]
    assert len(found) == 1
    message = str(found[0].message)
    assert "Stage(function flaky())" in message
    assert "(retry, timeout)" in message
    assert "SequentialPipeline([stage])" in message
    assert found[0].filename == __file__


async def test_in_a_pipeline_the_policies_apply_and_nothing_warns(mode: str) -> None:
    fn, calls = _flaky()
    pipeline = stageflow.SequentialPipeline([stageflow.Stage(fn, writes=["y"], retry=_retry())])
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolicyNotAppliedWarning)
        result = await _call(pipeline, mode, x=4)
    assert result.y == 4
    assert calls == [4, 4]


async def test_a_budget_of_a_stage_called_on_its_own_is_not_silent(mode: str) -> None:
    lm = FakeLM({"answer": "a"})
    s = stageflow.Stage(dspy.Predict("q -> answer"), budget={"max_calls": 1})
    with dspy.context(lm=lm), pytest.warns(PolicyNotAppliedWarning, match=r"Predict\(q -> answer\).*budget"):
        await _call(s, mode, q="1")


async def test_a_stage_subclass_in_a_pipeline_gets_its_policies_without_a_warning(mode: str) -> None:
    class Doubling(stageflow.Stage):
        def forward(self, **kwargs: Any) -> Any:
            out = super().forward(**kwargs)
            return {"y": out["y"] * 2}

        async def aforward(self, **kwargs: Any) -> Any:
            out = await super().aforward(**kwargs)
            return {"y": out["y"] * 2}

    fn, calls = _flaky()
    s = Doubling(fn, writes=["y"], retry=_retry())
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolicyNotAppliedWarning)
        result = await _call(stageflow.SequentialPipeline([s]), mode, x=3)
    assert result.y == 6
    assert calls == [3, 3]
    with pytest.warns(PolicyNotAppliedWarning, match="retry"):
        assert (await _call(s, mode, x=5))["y"] == 10  # on its own: no retry (none needed), warned


async def test_a_cached_stage_warns_only_for_what_its_own_forward_does_not_apply(mode: str) -> None:
    fn, _ = _flaky(failures=0)
    cached = stageflow.CachedStage(stageflow.stage(fn, writes=["y"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolicyNotAppliedWarning)
        await _call(cached, mode, x=1)  # its cache is its own forward's: applied, no warning
    retried = stageflow.CachedStage(stageflow.stage(fn, writes=["y"]), retry=_retry())
    with pytest.warns(PolicyNotAppliedWarning, match=r"\(retry\)"):
        await _call(retried, mode, x=1)


async def test_a_stage_held_by_a_modules_forward_warns(mode: str) -> None:
    fn, _ = _flaky(failures=0)

    class Holder(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.inner = stageflow.Stage(fn, writes=["y"], retry=_retry())

        def forward(self, x: int) -> Any:
            return dspy.Prediction(y=self.inner(x=x)["y"])

        async def aforward(self, x: int) -> Any:
            return dspy.Prediction(y=(await self.inner.acall(x=x))["y"])

    pipeline = stageflow.SequentialPipeline([stageflow.Stage(Holder(), writes=["y"])])
    with pytest.warns(PolicyNotAppliedWarning, match="retry"):
        assert (await _call(pipeline, mode, x=2)).y == 2


def test_a_stage_without_policies_never_warns() -> None:
    fn, _ = _flaky(failures=0)
    s = stageflow.Stage(fn, inputs={"x": "n"}, writes=["y"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", PolicyNotAppliedWarning)
        assert s(n=1) == {"y": 1}


def test_a_stage_wrapped_in_another_stage_warns_that_its_policies_are_not_applied() -> None:
    fn, calls = _flaky()
    inner = stageflow.Stage(fn, writes=["y"], retry=_retry())
    pipeline = stageflow.SequentialPipeline([stageflow.Stage(inner, outputs={"y": "z"})])
    with (
        pytest.warns(PolicyNotAppliedWarning, match="wrapped in another Stage"),
        pytest.raises(stageflow.StageError),
    ):
        pipeline(x=1)
    assert calls == [1]  # (the inner retry did not run: the warning says why)
