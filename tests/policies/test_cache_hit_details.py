"""A cache hit of a pattern keeps what the pattern found (``individual_results``, ``item_results``,
``route_decision``, ``num_iterations``): the first call's attributes work on the second call too
(verify-s22-user2 #1). Events, trace and usage stay the hit's own."""

from __future__ import annotations

import pytest

import stageflow
from stageflow import CachedStage, SequentialPipeline
from stageflow.testing import call


def answer(x: int) -> dict[str, str]:
    return {"answer": "A"}


async def test_an_ensemble_hit_keeps_its_individual_results(mode: str) -> None:
    ensemble = CachedStage(
        stageflow.EnsemblePipeline(
            [stageflow.stage(answer, writes=["answer"])] * 2, stageflow.ResultAggregator("majority")
        )
    )
    first = await call(ensemble, mode, x=1)
    hit = await call(ensemble, mode, x=1)
    assert len(first.individual_results) == len(hit.individual_results) == 2
    assert hit.answer == "A"
    assert ensemble.get_cache_stats()["hits"] == 1


async def test_a_foreach_hit_in_a_pipeline_keeps_its_details(mode: str) -> None:
    pipeline = SequentialPipeline(
        [
            CachedStage(
                stageflow.ForEach(
                    stageflow.stage(lambda x: {"y": x}, writes=["y"]), over="xs", item="x", collect="ys"
                )
            )
        ]
    )
    first = await call(pipeline, mode, xs=[1, 2])
    hit = await call(pipeline, mode, xs=[1, 2])
    assert sorted(first.details) == sorted(hit.details)
    assert "stages[0]" in hit.details
    assert [e.kind for e in hit.run.events] == ["cache_hit"]


@pytest.mark.parametrize("x", [1, -1])
async def test_a_branching_hit_keeps_its_route(mode: str, x: int) -> None:
    routed = CachedStage(
        stageflow.BranchingPipeline(
            router=stageflow.stage(lambda x: {"branch": "a" if x > 0 else "b"}, writes=["branch"]),
            branches={
                "a": stageflow.stage(lambda x: {"out": "pos"}, writes=["out"]),
                "b": stageflow.stage(lambda x: {"out": "neg"}, writes=["out"]),
            },
        )
    )
    first = await call(routed, mode, x=x)
    hit = await call(routed, mode, x=x)
    assert first.route_decision == hit.route_decision
    assert hit.route_decision.chosen == ("a" if x > 0 else "b")
    hit.run.extras.clear()  # (a hit's details are its own copy)
    assert (await call(routed, mode, x=x)).route_decision == first.route_decision
