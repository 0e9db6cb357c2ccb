"""A pipeline containing itself through a wrapper is a ConfigurationError too (issue 9).

Reproducer: ``a.stages.append(Stage(a))`` (or ``CachedStage(a)``, ``LazyStage(a)``) recursed until
``RecursionError``, reported as a StageError whose path repeated ``stages[1]`` hundreds of times;
``to_mermaid()`` and ``named_predictors()`` recursed as well. Now every entry point refuses it
with ``code="contains_itself"`` and the path where the loop closes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import stageflow
from stageflow import ConfigurationError
from stageflow.testing import call

up = stageflow.stage(lambda x: {"y": x.upper()}, writes=["y"], name="up")

WRAPPERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "Stage": (lambda p: stageflow.Stage(p, writes=["y"]), "module"),
    "CachedStage": (stageflow.CachedStage, "module"),
    "LazyStage": (stageflow.LazyStage, "underlying_stage"),
}


def looped(wrap: Callable[[Any], Any]) -> Any:
    a = stageflow.SequentialPipeline([up])
    a.stages.append(wrap(a))
    return a


def through_another(wrap: Callable[[Any], Any]) -> Any:
    a = stageflow.SequentialPipeline([up])
    b = stageflow.SequentialPipeline([wrap(a)])
    a.stages.append(wrap(b))
    return b


def _refused(info: pytest.ExceptionInfo[ConfigurationError], where: str) -> None:
    err = info.value
    assert err.code == "contains_itself"
    assert f"contains itself at '{where}'" in err.message
    assert len(err.message) < 400  # one loop named, not a path repeated to the recursion limit
    assert "deepcopy" in (err.hint or "")


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
async def test_calling_or_checking_it_is_a_configuration_error(wrapper: str, mode: str) -> None:
    wrap, attr = WRAPPERS[wrapper]
    with pytest.raises(ConfigurationError) as info:
        await call(looped(wrap), mode, x="q")
    _refused(info, f"stages[1].{attr}")
    with pytest.raises(ConfigurationError) as info:
        looped(wrap).check(["x"])
    _refused(info, f"stages[1].{attr}")


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
async def test_through_another_pipeline_too(wrapper: str, mode: str) -> None:
    wrap, _ = WRAPPERS[wrapper]
    with pytest.raises(ConfigurationError, match="contains itself") as info:
        await call(through_another(wrap), mode, x="q")
    assert info.value.code == "contains_itself"


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("what", ["to_mermaid", "to_dot", "named_predictors", "nest"])
def test_pictures_optimizers_and_nesting_refuse_it(wrapper: str, what: str) -> None:
    wrap, attr = WRAPPERS[wrapper]
    a = looped(wrap)
    action: Callable[[], Any] = (
        (lambda: stageflow.SequentialPipeline([a])) if what == "nest" else getattr(a, what)
    )
    with pytest.raises(ConfigurationError) as info:
        action()
    _refused(info, f"stages[1].{attr}")


def test_a_loop_deeper_inside_is_found_from_the_outer_pipeline() -> None:
    with pytest.raises(ConfigurationError) as info:  # wrapping it is refused at once
        stageflow.Stage(looped(WRAPPERS["Stage"][0]), writes=["y"])
    _refused(info, "stages[1].module")
    inner = stageflow.SequentialPipeline([up])
    outer = stageflow.SequentialPipeline([stageflow.Stage(inner, writes=["y"])])
    inner.stages.append(stageflow.Stage(inner, writes=["y"]))  # looped after it was wrapped
    with pytest.raises(ConfigurationError) as info:
        outer.to_mermaid()
    _refused(info, "stages[0].module.stages[1].module")


def test_the_same_pipeline_wrapped_twice_side_by_side_is_fine(mode: str) -> None:
    inner = stageflow.SequentialPipeline([up])
    outer = stageflow.SequentialPipeline([stageflow.Stage(inner, writes=["y"]), stageflow.LazyStage(inner)])
    assert outer(x="q").y == "Q"
    assert "flowchart" in outer.to_mermaid()
