"""Whose value a ForEach found no list in decides the command line's exit code (``run_failure``):
the caller's own value is bad input (2), a value a stage wrote is the run's failure (1). Decided by
identity against what the outermost call's caller gave (helper 92, C1-C3: by equality alone, an
unrelated equal input or an odd ``__eq__`` flipped it); a container a fan-out branch iterated as its
private copy by its equal content (so an unrelated caller container equal by chance counts too)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from stageflow import ContractError, ForEach, SequentialPipeline, stage
from stageflow.testing import call


@stage(writes=["y"])
def use(item: Any) -> dict[str, Any]:
    return {"y": item}


def _each() -> ForEach:
    return ForEach(use, over="docs", item="item", collect={"y": "ys"})


async def _blame(program: Any, mode: str, **inputs: Any) -> tuple[bool, str]:
    with pytest.raises(ContractError) as info:
        await call(program, mode, **inputs)
    assert info.value.code == "not_a_list"
    return info.value.run_failure, str(info.value.hint)


async def test_the_callers_own_value_is_bad_input_whatever_its_eq(mode: str) -> None:
    failure, hint = await _blame(SequentialPipeline([_each()]), mode, docs=np.array([1, 2, 3]))
    assert failure is False
    assert hint == "pass a list as 'docs'"
    failure, _ = await _blame(SequentialPipeline([_each()]), mode, docs=None)
    assert failure is False


async def test_a_value_a_stage_wrote_is_the_runs_failure_even_when_an_input_equals_it(mode: str) -> None:
    @stage(writes=["docs"])
    def nothing(q: str) -> dict[str, Any]:
        return {"docs": None}

    @stage(writes=["docs"])
    def mapping(q: str) -> dict[str, Any]:
        return {"docs": {"a": 1}}

    failure, hint = await _blame(SequentialPipeline([nothing, _each()]), mode, q="q", note=None)
    assert failure is True  # (the caller's note=None is not what the ForEach iterated)
    assert "upstream stage" in hint
    failure, _ = await _blame(SequentialPipeline([mapping, _each()]), mode, q="q", spare={"b": 2})
    assert failure is True
    failure, _ = await _blame(SequentialPipeline([nothing, _each()]), mode, q="q", docs_hint=None)
    assert failure is True  # (None is everyone's: the caller's only under the field's own name)


async def test_the_callers_container_iterated_as_a_branchs_copy_is_still_the_callers(mode: str) -> None:
    # (helper 93, 2b: a parallel branch sees a private copy, not the caller's object)
    from stageflow import ParallelPipeline

    @stage(writes=["other"])
    def other(q: int) -> dict[str, Any]:
        return {"other": q}

    group = ParallelPipeline([[_each(), other]], on_error="fail_fast")
    failure, _ = await _blame(group, mode, docs={"a": 1}, q=1)
    assert failure is False


async def test_a_callers_string_renamed_into_a_nested_pipeline_is_the_callers(mode: str) -> None:
    # (helper 93, 2a)
    from stageflow import Stage

    inner = Stage(SequentialPipeline([_each()]), inputs={"docs": "text"})
    failure, _ = await _blame(SequentialPipeline([inner]), mode, text="abc")
    assert failure is False


async def test_a_callers_value_renamed_into_a_nested_pipeline_is_still_the_callers(mode: str) -> None:
    from stageflow import Stage

    inner = Stage(SequentialPipeline([_each()]), inputs={"docs": "bundle"})
    failure, _ = await _blame(SequentialPipeline([inner]), mode, bundle={"a": 1})
    assert failure is False


async def test_a_small_number_or_empty_string_a_stage_wrote_is_the_runs_whatever_the_caller_passed(
    mode: str,
) -> None:
    # (helper 94: CPython keeps one 5 and one "" for everyone: an unrelated n=5 made it the caller's)
    @stage(writes=["docs"])
    def five(q: str) -> dict[str, Any]:
        return {"docs": 5}

    @stage(writes=["docs"])
    def empty(q: str) -> dict[str, Any]:
        return {"docs": ""}

    failure, _ = await _blame(SequentialPipeline([five, _each()]), mode, q="q", n=5)
    assert failure is True
    failure, _ = await _blame(SequentialPipeline([empty, _each()]), mode, q="", n=1)
    assert failure is True
    failure, hint = await _blame(SequentialPipeline([_each()]), mode, docs=5)
    assert failure is False
    assert hint == "pass a list as 'docs'"


async def test_an_empty_dict_a_stage_wrote_is_the_runs_though_the_caller_passed_one_elsewhere(
    mode: str,
) -> None:
    # (helper 95: equal content under another name, options={}, made it the caller's)
    @stage(writes=["docs"])
    def parse(q: str) -> dict[str, Any]:
        return {"docs": {}}

    failure, _ = await _blame(SequentialPipeline([parse, _each()]), mode, q="{}", options={})
    assert failure is True
