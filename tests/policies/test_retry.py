"""RetryPolicy: what is retried, how often, how long it waits, what it records, which object it calls."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import dspy
import pytest
from dspy.utils.callback import BaseCallback
from dspy.utils.exceptions import LMRateLimitError, LMServerError

import stageflow
from sleeps_kit import Sleeps
from stageflow import (
    ConfigurationError,
    Fallback,
    RetryPolicy,
    SequentialPipeline,
    Stage,
    StageError,
    TimeoutPolicy,
    stage,
)
from stageflow.testing import FakeLM, call


def policy(sleeps: Sleeps, **kw: Any) -> RetryPolicy:
    return RetryPolicy(sleep=sleeps.sleep, asleep=sleeps.asleep, **kw)


def flaky(errors: list[Callable[[], Exception]], out: str = "y") -> tuple[Any, list[dict[str, Any]]]:
    """A function stage raising ``errors`` in turn, then returning ``{out: 'ok'}``; and its call log."""
    seen: list[dict[str, Any]] = []
    lock = threading.Lock()

    def body(x: str) -> dict[str, Any]:
        with lock:
            seen.append({"x": x})
            n = len(seen)
        if n <= len(errors):
            raise errors[n - 1]()
        return {out: "ok"}

    return stage(body, writes=[out]), seen


RETRYABLE: dict[str, Callable[[], Exception]] = {
    "connection": lambda: ConnectionError("reset by peer"),
    "timeout": lambda: TimeoutError("read timed out"),
    "rate_limit": lambda: LMRateLimitError("slow down", model="m", status=429),
    "server": lambda: LMServerError("upstream 503", model="m", status=503),
}


# -- what is retried -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(RETRYABLE))
async def test_retryable_errors_are_retried_until_success(mode: str, kind: str) -> None:
    sleeps = Sleeps()
    body, seen = flaky([RETRYABLE[kind], RETRYABLE[kind]])
    p = SequentialPipeline([Stage(body, retry=policy(sleeps, max_attempts=3, jitter=0))])
    r = await call(p, mode, x="in")
    assert r.y == "ok"
    assert len(seen) == 3
    assert seen == [{"x": "in"}] * 3
    assert [e.kind for e in r.run.events] == ["retry", "retry"]
    assert len(sleeps.delays) == 2


async def test_value_error_is_not_retried(mode: str) -> None:
    sleeps = Sleeps()
    body, seen = flaky([lambda: ValueError("bad input")] * 5)
    p = SequentialPipeline([Stage(body, retry=policy(sleeps, max_attempts=5))])
    with pytest.raises(StageError) as info:
        await call(p, mode, x="in")
    assert len(seen) == 1
    assert sleeps.delays == []
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.stage_path == "stages[0]"


async def test_max_attempts_bounds_the_calls_and_the_last_error_propagates(mode: str) -> None:
    sleeps = Sleeps()
    errors = [lambda i=i: ConnectionError(f"attempt {i}") for i in range(1, 10)]
    body, seen = flaky(errors)
    p = SequentialPipeline([Stage(body, retry=policy(sleeps, max_attempts=4))])
    with pytest.raises(StageError) as info:
        await call(p, mode, x="in")
    assert len(seen) == 4
    assert len(sleeps.delays) == 3
    cause = info.value.__cause__
    assert isinstance(cause, ConnectionError)
    assert str(cause) == "attempt 4"


def test_max_attempts_one_means_no_retry() -> None:
    sleeps = Sleeps()
    body, seen = flaky([lambda: ConnectionError("x")])
    p = SequentialPipeline([Stage(body, retry=policy(sleeps, max_attempts=1))])
    with pytest.raises(StageError):
        p(x="in")
    assert len(seen) == 1
    assert sleeps.delays == []


def test_int_retry_is_max_attempts() -> None:
    s = Stage(lambda x: {"y": x}, writes=["y"], retry=5)
    assert s.policy.retry.max_attempts == 5


async def test_custom_retry_on_replaces_the_default_classification(mode: str) -> None:
    sleeps = Sleeps()
    only_value_errors = policy(sleeps, max_attempts=3, retry_on=lambda e: isinstance(e, ValueError))

    body, seen = flaky([lambda: ValueError("flaky parse")])
    r = await call(SequentialPipeline([Stage(body, retry=only_value_errors)]), mode, x="in")
    assert r.y == "ok"
    assert len(seen) == 2

    body2, seen2 = flaky([lambda: ConnectionError("not in retry_on")])
    with pytest.raises(StageError):
        await call(SequentialPipeline([Stage(body2, retry=only_value_errors)]), mode, x="in")
    assert len(seen2) == 1


def test_retry_on_sees_the_original_exception() -> None:
    seen_errors: list[BaseException] = []

    def retry_on(e: BaseException) -> bool:
        seen_errors.append(e)
        return True

    body, _ = flaky([lambda: KeyError("k")])
    p = SequentialPipeline([Stage(body, retry=RetryPolicy(retry_on=retry_on, sleep=lambda s: None))])
    assert p(x="in").y == "ok"
    assert len(seen_errors) == 1
    assert isinstance(seen_errors[0], KeyError)


# -- delays ----------------------------------------------------------------------------------------


async def test_delays_follow_exponential_backoff_with_injected_jitter(mode: str) -> None:
    sleeps = Sleeps()
    body, _ = flaky([lambda: ConnectionError("x")] * 3)
    retry = policy(
        sleeps, max_attempts=4, initial_delay=1.0, backoff=3.0, max_delay=100, jitter=0.5, rng=lambda: 0.5
    )
    r = await call(SequentialPipeline([Stage(body, retry=retry)]), mode, x="in")
    # base 1, 3, 9; each plus base * jitter * rng = base * 0.25
    assert sleeps.delays == pytest.approx([1.25, 3.75, 11.25])
    assert [e.delay for e in r.run.events] == pytest.approx(sleeps.delays)


def test_jitter_uses_the_injected_rng_each_time() -> None:
    draws = iter([0.0, 1.0, 0.5])
    sleeps = Sleeps()
    body, _ = flaky([lambda: ConnectionError("x")] * 3)
    retry = policy(
        sleeps, max_attempts=4, initial_delay=2.0, backoff=1.0, jitter=0.1, rng=lambda: next(draws)
    )
    SequentialPipeline([Stage(body, retry=retry)])(x="in")
    assert sleeps.delays == pytest.approx([2.0, 2.2, 2.1])


def test_zero_jitter_delays_cap_at_max_delay() -> None:
    sleeps = Sleeps()
    body, _ = flaky([lambda: ConnectionError("x")] * 5)
    retry = policy(sleeps, max_attempts=6, initial_delay=1.0, backoff=2.0, max_delay=5.0, jitter=0.0)
    SequentialPipeline([Stage(body, retry=retry)])(x="in")
    assert sleeps.delays == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0])


def test_delays_with_jitter_never_exceed_max_delay() -> None:
    retry = RetryPolicy(initial_delay=1.0, backoff=2.0, max_delay=5.0, jitter=0.5, rng=lambda: 0.99)
    delays = [retry.delay(attempt, ConnectionError("x")) for attempt in range(1, 8)]
    assert all(d <= 5.0 for d in delays), delays
    assert delays[:2] == pytest.approx([1.495, 2.99])
    assert delays[-1] == 5.0


async def test_provider_retry_after_is_honoured(mode: str) -> None:
    sleeps = Sleeps()
    body, _ = flaky([lambda: LMRateLimitError("429", model="m", retry_after=7)])
    retry = policy(sleeps, max_attempts=3, initial_delay=0.1, max_delay=10.0, jitter=0.5, rng=lambda: 0.9)
    r = await call(SequentialPipeline([Stage(body, retry=retry)]), mode, x="in")
    assert r.y == "ok"
    assert sleeps.delays == [7.0]  # not jittered
    assert r.run.events[0].delay == 7.0
    assert r.run.events[0].detail == {"retry_after": 7.0}  # what the server asked for, always


async def test_provider_retry_after_is_capped_by_max_delay(mode: str) -> None:
    sleeps = Sleeps()
    body, _ = flaky([lambda: LMRateLimitError("429", model="m", retry_after=7)])
    retry = policy(sleeps, max_attempts=3, initial_delay=0.1, max_delay=1.0, jitter=0.5, rng=lambda: 0.9)
    r = await call(SequentialPipeline([Stage(body, retry=retry)]), mode, x="in")
    assert r.y == "ok"
    assert sleeps.delays == [1.0]
    assert r.run.events[0].delay == 1.0
    assert r.run.events[0].detail == {"retry_after": 7.0}  # what the server asked for stays visible


def test_retry_after_found_on_a_wrapped_cause() -> None:
    def body(x: str) -> dict[str, Any]:
        if not hasattr(body, "done"):
            body.done = True  # type: ignore[attr-defined]
            try:
                raise LMRateLimitError("429", retry_after=3)
            except LMRateLimitError as e:
                raise RuntimeError("client wrapper") from e
        return {"y": "ok"}

    sleeps = Sleeps()
    p = SequentialPipeline([Stage(stage(body, writes=["y"]), retry=policy(sleeps, jitter=0))])
    assert p(x="in").y == "ok"
    assert sleeps.delays == [3.0]


def test_default_policy_really_waits_by_default_through_time_sleep() -> None:
    import time

    assert RetryPolicy().sleep is time.sleep
    assert RetryPolicy().asleep is None


# -- events ----------------------------------------------------------------------------------------


async def test_retry_events_record_attempt_error_and_delay(mode: str) -> None:
    sleeps = Sleeps()
    body, _ = flaky([lambda: ConnectionError("reset"), lambda: TimeoutError("slow")])
    retry = policy(sleeps, max_attempts=3, initial_delay=1.0, jitter=0)
    r = await call(SequentialPipeline([Stage(body, retry=retry)]), mode, x="in")
    events = r.run.events
    assert [(e.stage, e.kind, e.attempt) for e in events] == [
        ("stages[0]", "retry", 1),
        ("stages[0]", "retry", 2),
    ]
    assert events[0].error == "ConnectionError: reset"
    assert events[1].error == "TimeoutError: slow"
    assert [e.delay for e in events] == [1.0, 2.0]


def test_retry_events_of_a_nested_stage_carry_the_full_path() -> None:
    body, _ = flaky([lambda: ConnectionError("x")])
    inner = SequentialPipeline([lambda x: {"x2": x}, Stage(body, retry=RetryPolicy(sleep=lambda s: None))])
    outer = SequentialPipeline([lambda x: {"z": x}, inner])
    r = outer(x="in")
    assert [(e.stage, e.kind) for e in r.run.events] == [("stages[1].stages[1]", "retry")]


def test_a_clean_run_records_no_events() -> None:
    p = SequentialPipeline([Stage(lambda x: {"y": x}, writes=["y"], retry=3)])
    assert p(x="a").run.events == []


# -- the same stage object ----------------------------------------------------------------------------


class FlakyAfterPredict(dspy.Module):
    """Runs its predictor (a trace entry), then fails with a retryable error the first time."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("question -> answer")
        self.failures = 1

    def forward(self, question: str) -> Any:
        out = self.predict(question=question)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("lost after predicting")
        return out

    async def aforward(self, question: str) -> Any:
        out = await self.predict.acall(question=question)
        if self.failures:
            self.failures -= 1
            raise ConnectionError("lost after predicting")
        return out


async def test_each_attempt_leaves_a_trace_entry_of_the_same_predictor(mode: str) -> None:
    lm = FakeLM({"answer": "A"})
    module = FlakyAfterPredict()
    p = SequentialPipeline([Stage(module, retry=RetryPolicy(sleep=lambda s: None, asleep=_no_wait))])
    with dspy.context(lm=lm, trace=[]):
        r = await call(p, mode, question="q")
        trace = list(dspy.settings.trace)
    assert r.answer == "A"
    assert len(trace) == 2
    assert all(entry[0] is module.predict for entry in trace)
    assert [n for n, _ in p.named_predictors()] == ["stages[0].module.predict"]


async def _no_wait(seconds: float) -> None:
    return None


class ModuleCalls(BaseCallback):
    def __init__(self) -> None:
        self.calls: list[tuple[Any, dict[str, Any]]] = []

    def on_module_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.calls.append((instance, inputs))


async def test_retries_of_a_predict_call_the_same_object_with_new_rollout_ids(mode: str) -> None:
    # FakeLM(fail_times=...) raises RuntimeError, which DSPy wraps as LMUnexpectedError (not retryable
    # by default), so this test retries everything.
    lm = FakeLM({"answer": "A"}, fail_times=2)
    pred = dspy.Predict("question -> answer")
    retry = RetryPolicy(max_attempts=3, retry_on=lambda e: True, sleep=lambda s: None, asleep=_no_wait)
    p = SequentialPipeline([Stage(pred, retry=retry)])
    spy = ModuleCalls()
    with dspy.context(lm=lm, trace=[], callbacks=[spy]):
        r = await call(p, mode, question="q")
        trace = list(dspy.settings.trace)
    assert r.answer == "A"
    assert lm.calls == 3
    predict_calls = [(inst, inputs) for inst, inputs in spy.calls if isinstance(inst, dspy.Predict)]
    assert len(predict_calls) == 3
    assert all(inst is pred for inst, _ in predict_calls)
    rollouts = [(inputs["kwargs"].get("config") or {}).get("rollout_id") for _, inputs in predict_calls]
    assert rollouts[0] is None
    assert len(set(rollouts)) == 3
    assert len(trace) == 1
    assert trace[0][0] is pred
    assert [e.kind for e in r.run.events] == ["retry", "retry"]
    assert lm.history[-1]["kwargs"].get("rollout_id") == rollouts[-1]


def test_fake_lm_failures_are_not_retryable_by_default() -> None:
    lm = FakeLM({"answer": "A"}, fail_times=1)
    p = SequentialPipeline(
        [Stage(dspy.Predict("question -> answer"), retry=RetryPolicy(sleep=lambda s: None))]
    )
    with dspy.context(lm=lm), pytest.raises(StageError):
        p(question="q")
    assert lm.calls == 1


# -- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"max_attempts": -2},
        {"max_attempts": True},
        {"max_attempts": 2.5},
        {"initial_delay": -0.1},
        {"backoff": -1},
        {"max_delay": -1},
        {"jitter": -0.5},
    ],
)
def test_invalid_retry_options_raise_configuration_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy(**kwargs)
    assert info.value.code == "bad_option"
    assert info.value.field == next(iter(kwargs))


@pytest.mark.parametrize("seconds", [0, -1, True, "1"])
def test_invalid_timeout_raises_configuration_error(seconds: Any) -> None:
    with pytest.raises(ConfigurationError):
        TimeoutPolicy(seconds)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"retry": "3"},
        {"retry": 0},
        {"timeout": "fast"},
        {"repair": "yes"},
        {"fallback": 42},
        {"recover": "not callable"},
        {"skip_on": [ValueError, "x"]},
        {"cache": 0},
        {"cache": 2.5},
    ],
)
def test_invalid_stage_policy_arguments_raise_configuration_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Stage(lambda x: {"y": x}, writes=["y"], **kwargs)


def test_fallback_needs_exactly_one_of_stage_or_default() -> None:
    with pytest.raises(ConfigurationError):
        Fallback()
    with pytest.raises(ConfigurationError):
        Fallback(stage=dspy.Predict("q -> a"), default={"a": "x"})


def test_policies_are_frozen() -> None:
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        RetryPolicy().max_attempts = 9  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        TimeoutPolicy(1).seconds = 2  # type: ignore[misc]


def test_max_elapsed_stops_retrying_by_the_injected_clock() -> None:
    now = [0.0]
    attempts: list[int] = []

    def flaky(x: int) -> dict[str, int]:
        attempts.append(x)
        now[0] += 4.0  # each attempt "takes" 4 s on the fake clock
        raise ConnectionError("down")

    waits: list[float] = []
    policy = stageflow.RetryPolicy(
        max_attempts=10,
        initial_delay=1.0,
        jitter=0,
        max_elapsed=9.0,
        clock=lambda: now[0],
        sleep=waits.append,
    )
    p = stageflow.SequentialPipeline([stageflow.Stage(stageflow.stage(flaky, writes=["y"]), retry=policy)])
    with pytest.raises(stageflow.StageError) as err:
        p(x=1)
    assert len(attempts) == 2  # after try 2 the clock says 8 s; waiting 2 s more would pass 9 s
    assert waits == [1.0]
    assert [e.kind for e in err.value.events if e.kind == "retry"] == ["retry"]
