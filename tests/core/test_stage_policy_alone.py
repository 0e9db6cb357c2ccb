"""A Stage's policies hold wherever the stage is called. Called where no pipeline runs it (on its own,
from a module's ``forward``, wrapped in another ``Stage``), a stage used to run without them,
silently: ``Stage(fn, retry=...)(x=1)`` raised on the first failure, a fallback never replaced one.
It now runs as the one stage of a pipeline and returns what it returns; an error it raised itself
comes out as it was raised."""

from __future__ import annotations

import time
from typing import Any

import dspy
import pytest

import stageflow
from stageflow.patterns import solo
from stageflow.testing import FakeLM


def _flaky(failures: int = 1) -> tuple[Any, list[int]]:
    calls: list[int] = stageflow.untracked([])  # (a call log: not part of a cache key)

    def flaky(x: int) -> dict[str, int]:
        calls.append(x)
        if len(calls) <= failures:
            raise ConnectionError("reset")
        return {"y": x}

    return flaky, calls


def _retry(attempts: int = 3) -> stageflow.RetryPolicy:
    return stageflow.RetryPolicy(max_attempts=attempts, initial_delay=0, jitter=0)


async def _call(target: Any, mode: str, **kw: Any) -> Any:
    return target(**kw) if mode == "sync" else await target.acall(**kw)


async def test_a_retry_holds_for_a_stage_called_on_its_own(mode: str) -> None:
    fn, calls = _flaky(failures=2)
    s = stageflow.Stage(fn, writes=["y"], retry=_retry())
    assert await _call(s, mode, x=7) == {"y": 7}
    assert calls == [7, 7, 7]


async def test_spent_retries_raise_the_stages_own_error(mode: str) -> None:
    fn, calls = _flaky(failures=5)
    s = stageflow.Stage(fn, writes=["y"], retry=_retry(2))
    with pytest.raises(ConnectionError, match="reset") as raised:
        await _call(s, mode, x=1)
    assert calls == [1, 1]
    assert raised.value.__context__ is None  # (nothing of the pipeline chained to it)


async def test_a_timeout_and_a_fallback_hold_on_its_own(mode: str) -> None:
    def slow(q: str) -> dict[str, str]:
        time.sleep(1)
        return {"a": "late"}

    s = stageflow.Stage(
        stageflow.stage(slow, writes=["a"]), outputs={"a": "answer"}, timeout=0.05, fallback={"a": "default"}
    )
    t0 = time.perf_counter()
    out = await _call(s, mode, q="?")
    assert time.perf_counter() - t0 < 0.9
    assert dict(out) == {"answer": "default"}
    timed = stageflow.Stage(stageflow.stage(slow, writes=["a"]), timeout=0.05)
    with pytest.raises(stageflow.StageTimeoutError):
        await _call(timed, mode, q="?")


async def test_a_skipped_stage_returns_none(mode: str) -> None:
    def broken(x: int) -> dict[str, int]:
        raise KeyError("missing")

    s = stageflow.Stage(broken, writes=["y"], skip_on=[KeyError])
    assert await _call(s, mode, x=1) is None


async def test_a_budget_holds_for_a_stage_called_on_its_own(mode: str) -> None:
    class Twice(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.ask = dspy.Predict("q -> answer")

        def forward(self, q: str) -> Any:
            self.ask(q=q)
            return self.ask(q=q + "!")

    lm = FakeLM({"answer": "a"})
    s = stageflow.Stage(Twice(), writes=["answer"], budget={"max_calls": 1})
    with dspy.context(lm=lm), pytest.raises(stageflow.BudgetExceeded):
        await _call(s, mode, q="?")
    assert len(lm.history) == 1


@pytest.mark.parametrize(
    ("make", "kw"),
    [
        (lambda **p: stageflow.Stage(lambda x: {"y": x}, writes=["y"], **p), {"x": 1}),
        (
            lambda **p: stageflow.Stage(
                lambda x: {"y": x}, writes=["y"], inputs={"x": "n"}, outputs={"y": "z"}, **p
            ),
            {"n": 1},
        ),
        (lambda **p: stageflow.Stage(stageflow.stage(lambda x: x + 1, writes=["y"]), **p), {"x": 1}),
        (lambda **p: stageflow.Stage(dspy.Predict("q -> answer"), outputs={"answer": "a"}, **p), {"q": "x"}),
        (lambda **p: stageflow.Stage(dspy.ChainOfThought("q -> answer"), **p), {"q": "x"}),
    ],
    ids=["dict", "renamed", "one-output", "predict", "cot"],
)
async def test_a_policy_that_does_nothing_changes_nothing_of_the_result(
    mode: str, make: Any, kw: Any
) -> None:
    with dspy.context(lm=FakeLM({"answer": "hi", "reasoning": "r"})):
        plain = await _call(make(), mode, **kw)
        with_policy = await _call(make(retry=_retry()), mode, **kw)
    assert type(with_policy) is type(plain)
    assert with_policy == plain


async def test_a_stage_subclass_runs_its_own_code_once_around_the_policies(mode: str) -> None:
    class Doubling(stageflow.Stage):
        def forward(self, **kwargs: Any) -> Any:
            return {"y": super().forward(**kwargs)["y"] * 2}

        async def aforward(self, **kwargs: Any) -> Any:
            return {"y": (await super().aforward(**kwargs))["y"] * 2}

    fn, calls = _flaky()
    s = Doubling(fn, writes=["y"], retry=_retry())
    assert (await _call(s, mode, x=5))["y"] == 10
    assert calls == [5, 5]
    calls.clear()  # (it fails once more)
    assert (await _call(stageflow.SequentialPipeline([s]), mode, x=3)).y == 6
    assert calls == [3, 3]


async def test_a_cached_stage_with_a_retry_retries_and_caches_once(mode: str) -> None:
    fn, calls = _flaky()
    cached = stageflow.CachedStage(stageflow.stage(fn, writes=["y"]), retry=_retry())
    assert await _call(cached, mode, x=4) == {"y": 4}
    assert await _call(cached, mode, x=4) == {"y": 4}
    assert calls == [4, 4]  # one failed attempt, one that worked, then a hit
    assert (cached.cache_hits, cached.cache_misses) == (1, 1)


async def test_a_stage_held_by_a_modules_forward_gets_its_policies(mode: str) -> None:
    fn, calls = _flaky()

    class Holder(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.inner = stageflow.Stage(fn, writes=["y"], retry=_retry())

        def forward(self, x: int) -> Any:
            return dspy.Prediction(y=self.inner(x=x)["y"])

        async def aforward(self, x: int) -> Any:
            return dspy.Prediction(y=(await self.inner.acall(x=x))["y"])

    pipeline = stageflow.SequentialPipeline([stageflow.Stage(Holder(), writes=["y"])])
    assert (await _call(pipeline, mode, x=2)).y == 2
    assert calls == [2, 2]


def test_a_stage_wrapped_in_another_stage_gets_its_policies() -> None:
    fn, calls = _flaky()
    inner = stageflow.Stage(fn, writes=["y"], retry=_retry())
    pipeline = stageflow.SequentialPipeline([stageflow.Stage(inner, outputs={"y": "z"})])
    assert pipeline(x=1).z == 1
    assert calls == [1, 1]


def test_a_stage_without_policies_is_called_as_it_is() -> None:
    fn, _ = _flaky(failures=0)
    s = stageflow.Stage(fn, inputs={"x": "n"}, writes=["y"])
    assert s(n=1) == {"y": 1}
    assert s not in solo._SOLO


def test_replaced_policies_are_the_ones_applied() -> None:
    fn, calls = _flaky(failures=1)
    s = stageflow.Stage(fn, writes=["y"], retry=_retry(1))
    with pytest.raises(ConnectionError):
        s(x=1)
    s.policy = stageflow.Stage(fn, writes=["y"], retry=_retry(3)).policy
    assert s(x=2) == {"y": 2}
    assert calls == [1, 2]


async def test_a_missing_input_names_the_stage_and_the_field(mode: str) -> None:
    fn, calls = _flaky(failures=0)
    s = stageflow.Stage(fn, writes=["y"], inputs={"x": "n"}, retry=_retry())
    with pytest.raises(stageflow.ContractError, match=r"Stage\(function flaky\(\)\) needs input 'n'") as e:
        await _call(s, mode, x=1)
    assert e.value.field == "n"
    assert "pass n=... when calling the stage" in str(e.value)
    assert calls == []
