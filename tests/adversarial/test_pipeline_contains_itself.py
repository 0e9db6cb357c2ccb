"""A pipeline that contains itself is a ConfigurationError, never a RecursionError (issue 9)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import stageflow
from stageflow import ConfigurationError
from stageflow.testing import call


def double(x: int) -> dict[str, int]:
    return {"x": x * 2}


def step() -> Any:
    return stageflow.stage(double, writes=["x"])


def sequential_self() -> Any:
    p = stageflow.SequentialPipeline([step()])
    p.stages.append(p)
    return p


def through_another() -> Any:
    a = stageflow.SequentialPipeline([step()])
    b = stageflow.SequentialPipeline([a])
    a.stages.append(b)
    return b


def iterative_self() -> Any:
    p = stageflow.IterativePipeline([step()], stopping_condition=lambda state, i: i >= 2, max_iterations=2)
    p.stages.append(p)
    return p


def branching_self() -> Any:
    p = stageflow.BranchingPipeline(lambda x: "a", {"a": step(), "b": step()})
    p.branches["b"] = p
    return p


def parallel_self() -> Any:
    p = stageflow.ParallelPipeline([[step()], [stageflow.stage(lambda x: {"y": x}, writes=["y"])]])
    inner = stageflow.SequentialPipeline([step()])
    p.stages[0] = inner
    inner.stages.append(p)
    return p


CASES: dict[str, Callable[[], Any]] = {
    "sequential": sequential_self,
    "through another": through_another,
    "iterative": iterative_self,
    "branching": branching_self,
    "parallel": parallel_self,
}


@pytest.mark.parametrize("build", CASES.values(), ids=list(CASES))
async def test_running_a_pipeline_that_contains_itself_is_a_configuration_error(
    build: Callable[[], Any], mode: str
) -> None:
    program = build()  # changing a container is allowed; the next check or call finds the loop
    with pytest.raises(ConfigurationError) as info:
        await call(program, mode, x=1)
    assert info.value.code == "contains_itself"
    assert "contains itself" in info.value.message
    assert "deepcopy" in (info.value.hint or "")


def test_checking_it_is_a_configuration_error_too() -> None:
    with pytest.raises(ConfigurationError, match="contains itself"):
        sequential_self().check(["x"])


def test_nesting_it_in_a_new_pipeline_is_refused_when_built() -> None:
    looped = sequential_self()
    with pytest.raises(ConfigurationError, match="contains itself"):
        stageflow.SequentialPipeline([looped])


def test_the_same_pipeline_twice_side_by_side_is_fine(mode: str) -> None:
    inner = stageflow.SequentialPipeline([step()])
    outer = stageflow.SequentialPipeline([inner, inner])
    assert outer(x=1).x == 4
