"""Budget and rate-limit options: bad values are refused with an error naming the field."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import dspy
import pytest

import stageflow
from stageflow.budgets import Degrade, LMBudget, rate_limit, rate_limits


@pytest.fixture(autouse=True)
def _no_rate_limits_left() -> Iterator[None]:
    yield
    for limiter in stageflow.budgets.rate_limits().values():
        limiter.close()


@pytest.mark.parametrize("name", ["max_calls", "max_tokens", "max_cost", "max_seconds"])
@pytest.mark.parametrize("value", [-1, True, False, math.nan, math.inf, "10", [3]])
def test_bad_limits_are_refused(name: str, value: Any) -> None:
    with pytest.raises(stageflow.ConfigurationError) as info:
        LMBudget(**{name: value})
    assert info.value.field == name
    assert name in str(info.value)


@pytest.mark.parametrize("name", ["max_calls", "max_tokens"])
def test_int_limits_refuse_floats(name: str) -> None:
    with pytest.raises(stageflow.ConfigurationError, match=name):
        LMBudget(**{name: 2.5})


def test_zero_is_a_limit_and_none_is_no_limit() -> None:
    assert LMBudget(max_calls=0).max_calls == 0
    assert LMBudget().is_unlimited()
    assert LMBudget(max_cost=0.5, max_seconds=2).describe() == "max_cost=0.5, max_seconds=2"


@pytest.mark.parametrize("value", [0, -5, True, 1.5, None])
def test_default_max_tokens_must_be_a_positive_int(value: Any) -> None:
    with pytest.raises(stageflow.ConfigurationError, match="default_max_tokens"):
        LMBudget(default_max_tokens=value)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"at": 0, "max_members": 1}, "at"),
        ({"at": 1.5, "max_members": 1}, "at"),
        ({"at": math.nan, "max_members": 1}, "at"),
        ({"at": True, "max_members": 1}, "at"),
        ({"max_members": 0}, "max_members"),
        ({"max_members": True}, "max_members"),
        ({"skip": "stages[1]"}, "skip"),
        ({"skip": [""]}, "skip"),
        ({}, "lm"),
    ],
)
def test_bad_degradations_are_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(stageflow.ConfigurationError) as info:
        Degrade(**kwargs)
    assert info.value.field == field


def test_a_budget_takes_only_a_degrade_and_a_callable_clock() -> None:
    with pytest.raises(stageflow.ConfigurationError, match="degrade"):
        LMBudget(degrade={"at": 0.5})  # type: ignore[arg-type]
    with pytest.raises(stageflow.ConfigurationError, match="clock"):
        LMBudget(clock=3)  # type: ignore[arg-type]


def test_budget_arguments_are_checked_where_they_are_given() -> None:
    with pytest.raises(stageflow.ConfigurationError, match="unknown budget option"):
        stageflow.budget(max_call=3).__enter__()
    with pytest.raises(stageflow.ConfigurationError, match="not both"):
        stageflow.budget(LMBudget(max_calls=1), max_tokens=3).__enter__()
    with pytest.raises(stageflow.ConfigurationError, match="budget takes"):
        stageflow.Stage(dspy.Predict("q -> a"), budget=5)
    with pytest.raises(stageflow.ConfigurationError, match="max_tokens"):
        stageflow.SequentialPipeline([dspy.Predict("q -> a")]).set_budget(max_tokens=-3)
    with pytest.raises(stageflow.ConfigurationError, match="max_calls"):
        stageflow.Stage(dspy.Predict("q -> a"), budget={"max_calls": math.nan})


def test_set_budget_none_removes_it_and_returns_the_pipeline() -> None:
    pipe = stageflow.SequentialPipeline([dspy.Predict("q -> a")])
    assert pipe.set_budget(max_calls=2) is pipe
    assert pipe.lm_budget == LMBudget(max_calls=2)
    assert pipe.set_budget(None).lm_budget is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rpm": 0}, "rpm"),
        ({"rpm": -1}, "rpm"),
        ({"rpm": True}, "rpm"),
        ({"rpm": 1.5}, "rpm"),
        ({"tpm": math.nan}, "tpm"),
        ({}, "rpm"),
        ({"rpm": 5, "window": 0}, "window"),
        ({"rpm": 5, "window": math.inf}, "window"),
    ],
)
def test_bad_rate_limits_are_refused(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(stageflow.ConfigurationError) as info:
        rate_limit("openai/gpt-4o-mini", **kwargs)
    assert info.value.field == field
    assert rate_limits() == {}


@pytest.mark.parametrize("model", ["", None, 3])
def test_a_rate_limit_needs_a_model_string(model: Any) -> None:
    with pytest.raises(stageflow.ConfigurationError, match="model"):
        rate_limit(model, rpm=3)


def test_a_new_rate_limit_replaces_the_old_one_and_close_lifts_it() -> None:
    first = rate_limit("m", rpm=3)
    second = rate_limit("m", rpm=5)
    assert rate_limits() == {"m": second}
    first.close()  # no longer registered: closing it changes nothing
    assert rate_limits() == {"m": second}
    second.close()
    assert rate_limits() == {}
