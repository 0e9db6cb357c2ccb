"""Ensemble votes are weighed only by confidences that mean something (issue 9).

Reproducer: weighted voting accepted NaN, negative and string confidences (zeroing them) and then
reported ``confidence=1.0`` although one of three members disagreed. Such a confidence is now a
ContractError naming the member by stage path and quoting the value.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

import stageflow
from stageflow import ContractError, ResultAggregator
from stageflow.testing import call


def member(answer: str, confidence: Any, i: int) -> Any:
    return stageflow.stage(
        lambda question: {"answer": answer, "confidence": confidence},
        writes=["answer", "confidence"],
        name=f"m{i}",
    )


def ensemble(bad: Any, strategy: str = "weighted_voting") -> Any:
    members = [member("Paris", 0.9, 0), member("Paris", 0.8, 1), member("Lyon", bad, 2)]
    return stageflow.EnsemblePipeline(members, ResultAggregator(strategy))


@pytest.mark.parametrize("bad", [math.nan, -5.0, "high", math.inf, 1.5, True, None])
async def test_an_invalid_confidence_is_refused_naming_the_member(bad: Any, mode: str) -> None:
    with pytest.raises(ContractError) as info:
        await call(ensemble(bad), mode, question="q")
    err = info.value
    assert err.code == "bad_confidence"
    assert err.field == "confidence"
    assert err.stage_path == "processors[2]"
    assert repr(bad) in err.message
    assert "'processors[2]'" in err.message


@pytest.mark.parametrize("strategy", ["best_confidence", "consensus", "majority"])
async def test_every_builtin_strategy_refuses_it(strategy: str, mode: str) -> None:
    with pytest.raises(ContractError, match="processors\\[2\\]"):
        await call(ensemble(math.nan, strategy), mode, question="q")


async def test_nested_the_member_path_is_the_full_path_once(mode: str) -> None:
    outer = stageflow.SequentialPipeline(
        [stageflow.stage(lambda q: {"question": q}, writes=["question"]), ensemble(-1)]
    )
    with pytest.raises(ContractError) as info:
        await call(outer, mode, q="q")
    assert info.value.stage_path == "stages[1].processors[2]"


async def test_a_valid_confidence_weighs_the_vote_honestly(mode: str) -> None:
    result = await call(ensemble(0.7), mode, question="q")
    assert result.answer == "Paris"
    assert result.confidence == pytest.approx(1.7 / 2.4)  # the winners' share of the weight, not 1.0
    assert result.votes == pytest.approx({"paris": 1.7, "lyon": 0.7})


async def test_a_numeric_string_counts_as_its_number(mode: str) -> None:
    result = await call(ensemble("0.7"), mode, question="q")
    assert result.confidence == pytest.approx(1.7 / 2.4)


def test_aggregate_called_directly_names_the_member_by_position() -> None:
    with pytest.raises(ContractError, match=r"'member 1' reported confidence -0\.2"):
        ResultAggregator().aggregate(
            [{"answer": "a", "confidence": 0.9}, {"answer": "b", "confidence": -0.2}]
        )
