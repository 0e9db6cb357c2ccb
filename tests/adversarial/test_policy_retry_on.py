"""Issue 9, RetryPolicy: ``retry_on=ValueError`` (a type, or a tuple of types, as LangGraph users
write it) retries only those types — it used to be called as a predicate, so every error was
retried; a predicate still works; anything else is refused when the policy is made."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from stageflow import (
    ConfigurationError,
    RepairPolicy,
    RetryPolicy,
    SequentialPipeline,
    Stage,
    StageError,
    stage,
)
from stageflow.testing import call


def no_wait(seconds: float) -> None:
    del seconds


async def ano_wait(seconds: float) -> None:
    del seconds


def flaky(errors: list[Callable[[], Exception]]) -> tuple[Any, list[int]]:
    """A stage raising ``errors`` in turn, then returning ``{"y": "ok"}``; and its call count."""
    calls: list[int] = []
    lock = threading.Lock()

    def body(x: str) -> dict[str, str]:
        with lock:
            calls.append(1)
            n = len(calls)
        if n <= len(errors):
            raise errors[n - 1]()
        return {"y": "ok"}

    return stage(body, writes=["y"]), calls


def retry(retry_on: Any) -> RetryPolicy:
    return RetryPolicy(max_attempts=3, retry_on=retry_on, sleep=no_wait, asleep=ano_wait)


async def test_a_type_retries_that_type(mode: str) -> None:
    body, calls = flaky([lambda: ValueError("flaky parse")])
    result = await call(SequentialPipeline([Stage(body, retry=retry(ValueError))]), mode, x="in")
    assert result.y == "ok"
    assert len(calls) == 2


async def test_a_type_does_not_retry_other_types(mode: str) -> None:
    body, calls = flaky([lambda: KeyError("not a ValueError")])
    with pytest.raises(StageError) as info:
        await call(SequentialPipeline([Stage(body, retry=retry(ValueError))]), mode, x="in")
    assert len(calls) == 1
    assert isinstance(info.value.__cause__, KeyError)
    assert [e.kind for e in info.value.events or []] == []


async def test_a_subclass_matches(mode: str) -> None:
    body, calls = flaky([lambda: UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad byte")])
    result = await call(SequentialPipeline([Stage(body, retry=retry(ValueError))]), mode, x="in")
    assert result.y == "ok"
    assert len(calls) == 2


async def test_a_tuple_retries_each_of_its_types_and_nothing_else(mode: str) -> None:
    body, calls = flaky([lambda: ValueError("a"), lambda: ConnectionError("b")])
    policy = retry((ValueError, ConnectionError))
    result = await call(SequentialPipeline([Stage(body, retry=policy)]), mode, x="in")
    assert result.y == "ok"
    assert len(calls) == 3

    body2, calls2 = flaky([lambda: TypeError("c")])
    with pytest.raises(StageError):
        await call(SequentialPipeline([Stage(body2, retry=policy)]), mode, x="in")
    assert len(calls2) == 1


async def test_a_type_matches_an_error_raised_from_it(mode: str) -> None:
    """DSPy raises its LM errors ``from`` the provider's: the provider's type is what users name."""

    def wrapped() -> Exception:
        try:
            raise ValueError("provider said no")
        except ValueError as e:
            try:
                raise RuntimeError("client wrapper") from e
            except RuntimeError as outer:
                return outer

    body, calls = flaky([wrapped])
    result = await call(SequentialPipeline([Stage(body, retry=retry(ValueError))]), mode, x="in")
    assert result.y == "ok"
    assert len(calls) == 2


async def test_an_error_raised_while_handling_another_is_not_that_error(mode: str) -> None:
    def during_handling() -> Exception:
        try:
            raise ValueError("handled")
        except ValueError:
            try:
                raise KeyError("a bug in the handler")
            except KeyError as bug:
                return bug

    body, calls = flaky([during_handling])
    with pytest.raises(StageError):
        await call(SequentialPipeline([Stage(body, retry=retry(ValueError))]), mode, x="in")
    assert len(calls) == 1


async def test_a_predicate_still_decides(mode: str) -> None:
    body, calls = flaky([lambda: KeyError("retry me")])
    policy = retry(lambda e: isinstance(e, KeyError) and "retry" in str(e))
    result = await call(SequentialPipeline([Stage(body, retry=policy)]), mode, x="in")
    assert result.y == "ok"
    assert len(calls) == 2


def test_the_policy_keeps_what_was_given() -> None:
    policy = RetryPolicy(retry_on=(ValueError, KeyError))
    assert policy.retry_on == (ValueError, KeyError)
    assert policy == RetryPolicy(retry_on=(ValueError, KeyError))
    assert policy.should_retry(KeyError("k"))
    assert not policy.should_retry(TypeError("t"))


@pytest.mark.parametrize(
    "bad",
    [3, "ValueError", (), (ValueError, int), [ValueError], (ValueError, "KeyError"), int, None],
    ids=repr,
)
def test_anything_else_is_refused_when_the_policy_is_made(bad: object) -> None:
    with pytest.raises(ConfigurationError) as info:
        RetryPolicy(retry_on=bad)  # type: ignore[arg-type]
    assert info.value.field == "retry_on"
    assert "retry_on" in str(info.value)
    assert repr(bad) in str(info.value)


def test_repair_on_takes_the_same_forms() -> None:
    assert RepairPolicy(repair_on=KeyError).should_repair(KeyError("k"))
    assert not RepairPolicy(repair_on=(KeyError,)).should_repair(ValueError("v"))
    with pytest.raises(ConfigurationError) as info:
        RepairPolicy(repair_on="KeyError")  # type: ignore[arg-type]
    assert info.value.field == "repair_on"
