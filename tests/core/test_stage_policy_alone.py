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


class _Twice(dspy.Module):  # type: ignore[misc]
    """Two LM calls per call."""

    def __init__(self) -> None:
        super().__init__()
        self.ask = dspy.Predict("q -> answer")

    def forward(self, q: str) -> Any:
        self.ask(q=q)
        return self.ask(q=q + "!")


class _Holder(dspy.Module):  # type: ignore[misc]
    """A module whose own forward calls a retrying Stage around ``fn``."""

    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.inner = stageflow.Stage(fn, writes=["y"], retry=_retry())

    def forward(self, x: int) -> Any:
        return dspy.Prediction(y=self.inner(x=x)["y"])

    async def aforward(self, x: int) -> Any:
        return dspy.Prediction(y=(await self.inner.acall(x=x))["y"])


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
    lm = FakeLM({"answer": "a"})
    s = stageflow.Stage(_Twice(), writes=["answer"], budget={"max_calls": 1})
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

    pipeline = stageflow.SequentialPipeline([stageflow.Stage(_Holder(fn), writes=["y"])])
    assert (await _call(pipeline, mode, x=2)).y == 2
    assert calls == [2, 2]


def test_a_stage_wrapped_in_another_stage_gets_its_policies() -> None:
    fn, calls = _flaky()
    inner = stageflow.Stage(fn, writes=["y"], retry=_retry())
    pipeline = stageflow.SequentialPipeline([stageflow.Stage(inner, outputs={"y": "z"})])
    assert pipeline(x=1).z == 1
    assert calls == [1, 1]


def test_a_stage_without_policies_is_called_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a stage without policies took the policy path")

    monkeypatch.setattr(solo, "call_alone", refuse)
    fn, _ = _flaky(failures=0)
    s = stageflow.Stage(fn, inputs={"x": "n"}, writes=["y"])
    assert s(n=1) == {"y": 1}
    assert s.forward(n=2) == {"y": 2}


def test_replaced_policies_are_the_ones_applied() -> None:
    fn, calls = _flaky(failures=1)
    s = stageflow.Stage(fn, writes=["y"], retry=_retry(1))
    with pytest.raises(ConnectionError):
        s(x=1)
    s.policy = stageflow.Stage(fn, writes=["y"], retry=_retry(3)).policy
    assert s(x=2) == {"y": 2}
    assert calls == [1, 2]


async def test_a_missing_or_unknown_input_fails_as_without_the_policy(mode: str) -> None:
    fn, calls = _flaky(failures=0)
    plain = stageflow.Stage(fn, writes=["y"], inputs={"x": "n"})
    retried = stageflow.Stage(fn, writes=["y"], inputs={"x": "n"}, retry=_retry())
    # A missing input is the ContractError a pipeline raises, naming the field as the caller passes it.
    for kw in ({"z": 1}, {}):
        with pytest.raises(stageflow.ContractError, match="needs input 'n'") as without:
            await _call(plain, mode, **kw)
        with pytest.raises(stageflow.ContractError) as with_policy:
            await _call(retried, mode, **kw)
        assert str(with_policy.value) == str(without.value)
        assert (without.value.code, without.value.field) == ("missing_input", "n")
    with pytest.raises(TypeError) as without:
        await _call(plain, mode, n=1, verbose=True)
    with pytest.raises(TypeError) as with_policy:
        await _call(retried, mode, n=1, verbose=True)
    assert str(with_policy.value) == str(without.value)
    assert calls == []


# -- helper 77's findings ----------------------------------------------------------------------


async def test_what_the_policies_did_joins_the_run_of_the_calling_stage(mode: str) -> None:
    fn, _ = _flaky()

    first = stageflow.Stage(lambda x: {"x2": x}, writes=["x2"])
    pipeline = stageflow.SequentialPipeline([first, stageflow.Stage(_Holder(fn), writes=["y"])])
    result = await _call(pipeline, mode, x=2)
    assert [(e.kind, e.stage) for e in result.run.events] == [("retry", "stages[1]")]
    fn2, _ = _flaky()
    wrapped = stageflow.SequentialPipeline(
        [stageflow.Stage(stageflow.Stage(fn2, writes=["y"], retry=_retry()))]
    )
    assert [e.kind for e in (await _call(wrapped, mode, x=1)).run.events] == ["retry"]


async def test_a_skipped_stage_gives_none_and_a_wrapping_stage_says_why_it_cannot_skip(mode: str) -> None:
    def boom(question: str) -> dict[str, str]:
        raise ValueError("model down")

    optional = stageflow.Stage(boom, writes=["answer"], skip_on=[ValueError])
    assert await _call(optional, mode, question="q") is None  # (on its own: skipped, None)

    class Caller(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.optional = optional

        def forward(self, question: str) -> Any:
            return dspy.Prediction(answer=(self.optional(question=question) or {}).get("answer", "none"))

    assert (await _call(stageflow.SequentialPipeline([Caller()]), mode, question="q")).answer == "none"
    wrapped = stageflow.SequentialPipeline([stageflow.Stage(optional)])
    with pytest.raises(stageflow.StageError, match=r"Stage\(function boom\(\)\) gave no result"):
        await _call(wrapped, mode, question="q")


async def test_a_subclass_on_its_own_runs_its_whole_call_under_the_policies(mode: str) -> None:
    seen: list[str] = stageflow.untracked([])

    class Titled(stageflow.Stage):
        def forward(self, **kwargs: Any) -> Any:
            seen.append("forward")
            if len(seen) == 1:
                raise ConnectionError("own code flaked")  # (retried: the policies wrap this code)
            return {"title": super().forward(**kwargs)["title"].upper()}

    s = Titled(lambda x: {"y": x}, writes=["y"], outputs={"y": "title"}, retry=_retry())
    assert await _call(s, mode, x="a") == {"title": "A"}
    assert seen == ["forward", "forward"]

    class Skipping(stageflow.Stage):
        def forward(self, **kwargs: Any) -> Any:
            return {"y": super().forward(**kwargs)["y"] + 1}

    def broken(x: int) -> dict[str, int]:
        raise KeyError("x")

    assert await _call(Skipping(broken, writes=["y"], skip_on=[KeyError]), mode, x=1) is None


async def test_a_subclass_with_only_forward_gives_the_same_answer_under_acall() -> None:
    class Exclaiming(stageflow.Stage):
        def forward(self, **kwargs: Any) -> Any:
            return {"title": super().forward(**kwargs)["title"] + "!"}

    s = Exclaiming(lambda q: {"title": q}, writes=["title"])
    assert s(q="a") == await s.acall(q="a") == {"title": "a!"}
    pipeline = stageflow.SequentialPipeline([s])
    assert pipeline(q="a").title == (await pipeline.acall(q="a")).title == "a!"

    class CachedExclaiming(stageflow.CachedStage):
        def forward(self, **kwargs: Any) -> Any:
            return {"title": super().forward(**kwargs)["title"] + "!"}

    c = CachedExclaiming(stageflow.stage(lambda q: {"title": q}, writes=["title"]))
    assert c(q="b") == await c.acall(q="b") == {"title": "b!"}


async def test_inputs_are_taken_as_without_the_policy(mode: str) -> None:
    fn, _ = _flaky(failures=0)
    renamed = stageflow.Stage(fn, writes=["y"], inputs={"x": "n"}, retry=_retry())
    assert await _call(renamed, mode, x=3) == await _call(renamed, mode, n=3) == {"y": 3}

    def takes_more(x: int, **extra: Any) -> dict[str, Any]:
        return {"y": (x, extra)}

    more = stageflow.Stage(takes_more, writes=["y"], retry=_retry())
    assert await _call(more, mode, x=1, extra=2) == {"y": (1, {"extra": 2})}


async def test_a_timeout_on_its_own_names_the_function(mode: str) -> None:
    def slow(q: str) -> dict[str, str]:
        time.sleep(0.5)
        return {"a": q}

    s = stageflow.Stage(slow, writes=["a"], timeout=0.05)
    with pytest.raises(stageflow.StageTimeoutError, match=r"^Stage\(function slow\(\)\) took longer"):
        await _call(s, mode, q="?")


# -- helper 76's findings ----------------------------------------------------------------------


async def test_a_recovered_stage_gives_the_fields_its_strategy_returned(mode: str) -> None:
    def bad(x: int) -> dict[str, int]:
        raise ValueError("bad")

    s = stageflow.Stage(bad, writes=["y"], recover=lambda error, state: {"y": "recovered"})
    assert await _call(s, mode, x=1) == {"y": "recovered"}


async def test_a_custom_modules_bare_return_value_comes_back_as_it_is(mode: str) -> None:
    class Shout(dspy.Module):  # type: ignore[misc]
        def forward(self, text: str) -> str:
            return text.upper()

        async def aforward(self, text: str) -> str:
            return text.upper()

    s = stageflow.Stage(Shout(), retry=_retry())
    assert await _call(s, mode, text="hi") == "HI"
    quiet = stageflow.Stage(lambda x: None, retry=_retry())
    assert await _call(quiet, mode, x=1) is None


def test_a_replaced_fallback_stage_is_the_one_run() -> None:
    def bad(q: str) -> dict[str, str]:
        raise ValueError("bad")

    s = stageflow.Stage(bad, writes=["a"], fallback=lambda q: {"a": "first"})
    assert s(q="?") == {"a": "first"}
    s.fallback_stage = stageflow.stage(lambda q: {"a": "replaced"}, writes=["a"])
    assert s(q="?") == {"a": "replaced"}


def test_a_program_holding_a_policy_stage_is_freed() -> None:
    import gc
    import weakref

    class Program(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.fetch = stageflow.Stage(self._fetch, writes=["y"], retry=_retry())

        def _fetch(self, x: int) -> dict[str, int]:
            return {"y": x}

        def forward(self, x: int) -> Any:
            return self.fetch(x=x)

    refs = []
    for _ in range(5):
        program = Program()
        assert program(x=1) == {"y": 1}
        refs.append(weakref.ref(program))
        del program
    gc.collect()
    assert [r() for r in refs] == [None] * 5


def test_an_unhashable_stage_subclass_works_on_its_own() -> None:
    class Compared(stageflow.Stage):
        def forward(self, **kwargs: Any) -> Any:
            return super().forward(**kwargs)

        def __eq__(self, other: object) -> bool:
            return isinstance(other, Compared)

    fn, calls = _flaky()
    assert Compared(fn, writes=["y"], retry=_retry())(x=1) == {"y": 1}
    assert calls == [1, 1]


def test_a_stageflow_error_the_stage_raises_itself_comes_out_unchanged() -> None:
    own = stageflow.StageError("inner pipeline failed", stage_path="foo")

    def failing(x: int) -> dict[str, int]:
        raise own

    s = stageflow.Stage(failing, writes=["y"], retry=_retry(2))
    with pytest.raises(stageflow.StageError) as raised:
        s(x=1)
    assert raised.value is own
    assert own.stage_path == "foo"


# -- helper 78's findings ----------------------------------------------------------------------


async def test_swapped_renames_of_a_stage_around_a_stage_apply_once(mode: str) -> None:
    inner = stageflow.Stage(stageflow.stage(lambda a, b: {"d": a - b}, writes=["d"]))
    plain = stageflow.Stage(inner, inputs={"a": "b", "b": "a"})
    retried = stageflow.Stage(inner, inputs={"a": "b", "b": "a"}, retry=_retry())
    assert await _call(retried, mode, a=1, b=5) == await _call(plain, mode, a=1, b=5)
    assert (await _call(retried, mode, a=1, b=5))["d"] == 4


async def test_a_cached_stage_never_keeps_a_fallback_or_recovered_result(mode: str) -> None:
    broken = stageflow.untracked([True])

    def sometimes(x: int) -> dict[str, str]:
        if broken[0]:
            raise ValueError("down")
        return {"y": "real"}

    for policy in ({"fallback": {"y": "fb"}}, {"recover": lambda error, state: {"y": "rec"}}):
        broken[0] = True
        cached = stageflow.CachedStage(stageflow.stage(sometimes, writes=["y"]), **policy)
        assert (await _call(cached, mode, x=1))["y"] in ("fb", "rec")
        broken[0] = False
        assert await _call(cached, mode, x=1) == {"y": "real"}
        assert await _call(cached, mode, x=1) == {"y": "real"}
        assert cached.cache_hits == 1


async def test_a_subclasses_own_call_method_runs_once(mode: str) -> None:
    seen: list[str] = stageflow.untracked([])

    class Exclaim(stageflow.Stage):
        def __call__(self, **kwargs: Any) -> Any:
            seen.append("call")
            kwargs["x"] += "!"
            return super().__call__(**kwargs)

        async def acall(self, **kwargs: Any) -> Any:
            seen.append("acall")
            kwargs["x"] += "!"
            return await super().acall(**kwargs)

    s = Exclaim(lambda x: {"y": x}, writes=["y"], retry=_retry())
    assert await _call(s, mode, x="a") == {"y": "a!"}
    assert len(seen) == 1


def test_an_error_of_the_stages_own_code_keeps_its_path_and_message() -> None:
    own = stageflow.ContractError("Stage 'stage' (function needz()) needs input 'z'", stage_path="stage")

    def failing(x: int) -> dict[str, int]:
        raise own

    with pytest.raises(stageflow.ContractError) as raised:
        stageflow.Stage(failing, writes=["y"], retry=_retry())(x=1)
    assert raised.value is own
    assert (own.stage_path, own.message) == ("stage", "Stage 'stage' (function needz()) needs input 'z'")


def test_a_budget_message_names_the_stage() -> None:
    s = stageflow.Stage(_Twice(), writes=["answer"], budget={"max_calls": 1})
    with dspy.context(lm=FakeLM({"answer": "a"})), pytest.raises(stageflow.BudgetExceeded) as raised:
        s(q="?")
    assert "<stage>" not in str(raised.value)
    assert "Twice" in str(raised.value)


def test_a_cached_stage_hit_joins_the_calling_runs_events() -> None:
    cached = stageflow.CachedStage(stageflow.stage(lambda x: {"y": x}, writes=["y"]))

    class Caller(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.cached = cached

        def forward(self, x: int) -> Any:
            return dspy.Prediction(y=self.cached(x=x)["y"])

    pipeline = stageflow.SequentialPipeline([stageflow.Stage(Caller(), writes=["y"])])
    pipeline(x=1)
    assert [(e.kind, e.stage) for e in pipeline(x=1).run.events] == [("cache_hit", "stages[0]")]


# -- helper 79's findings ----------------------------------------------------------------------


async def test_a_cached_stage_subclasss_own_forward_called_directly_runs_once(mode: str) -> None:
    seen: list[str] = stageflow.untracked([])

    class Logged(stageflow.CachedStage):
        def forward(self, **kwargs: Any) -> Any:
            seen.append("forward")
            return super().forward(**kwargs)

        async def aforward(self, **kwargs: Any) -> Any:
            seen.append("aforward")
            return await super().aforward(**kwargs)

    fn, calls = _flaky()
    s = Logged(stageflow.stage(fn, writes=["y"]), retry=_retry())
    out = s.forward(x=1) if mode == "sync" else await s.aforward(x=1)
    assert out == {"y": 1}
    assert len(seen) == 1
    assert calls == [1, 1]


def test_no_placeholder_name_reaches_warnings_or_budget_errors() -> None:
    import warnings as _warnings

    class Opaque:  # (an input the cache cannot key exactly: it warns)
        __slots__ = ()

    s = stageflow.Stage(lambda x: {"y": 1}, writes=["y"], cache=True, retry=_retry())
    with _warnings.catch_warnings(record=True) as caught:
        _warnings.simplefilter("always")
        s(x=Opaque())
    texts = [str(w.message) for w in caught]
    assert texts
    assert not any("<stage>" in t or "'stage'" in t for t in texts)

    budgeted = stageflow.Stage(_Twice(), writes=["answer"], budget={"max_calls": 1})
    with dspy.context(lm=FakeLM({"answer": "a"})), pytest.raises(stageflow.BudgetExceeded) as raised:
        budgeted(q="?")
    assert "<stage>" not in str(raised.value.scope)


def test_a_cached_stage_around_a_stage_caches_once_in_a_pipeline() -> None:
    fn, _ = _flaky(failures=0)
    cached = stageflow.CachedStage(stageflow.Stage(fn, writes=["y"], retry=_retry()))
    pipeline = stageflow.SequentialPipeline([cached])
    pipeline(x=1)
    pipeline(x=1)
    stats = cached.get_cache_stats()
    assert (stats["hits"], stats["misses"], stats["cache_size"]) == (1, 1, 1)
