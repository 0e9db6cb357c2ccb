"""``ForEach(pipeline_of_undeclared_modules, collect="title")`` runs (issues 8 and 9).

Reproducer: ``ForEach(SequentialPipeline([Ext()]), collect="title")`` was refused when built
("collect='title' is not one of the stage's outputs []") although ``ForEach(Ext(), ...)`` works.
A nested pipeline holding an undeclared stage has open outputs: the collected field is checked
per element at run time instead.
"""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ConfigurationError, ContractError
from stageflow.testing import call


class Ext(dspy.Module):
    def forward(self, text: str) -> dspy.Prediction:
        return dspy.Prediction(title=text.upper())


BUILDS = {
    "module": lambda collect: stageflow.ForEach(Ext(), over="texts", item="text", collect=collect),
    "pipeline": lambda collect: stageflow.ForEach(
        stageflow.SequentialPipeline([Ext()]), over="texts", item="text", collect=collect
    ),
    "pipeline after a declared stage": lambda collect: stageflow.ForEach(
        stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": len(text)}, writes=["n"]), Ext()]),
        over="texts",
        item="text",
        collect=collect,
    ),
}


@pytest.mark.parametrize("build", BUILDS.values(), ids=list(BUILDS))
@pytest.mark.parametrize("collect", ["title", {"title": "titles"}])
async def test_collect_names_a_field_the_undeclared_stage_produces(
    build: Any, collect: Any, mode: str
) -> None:
    pipeline = stageflow.SequentialPipeline([build(collect)])
    result = await call(pipeline, mode, texts=["a", "b"])
    field = "title" if isinstance(collect, str) else "titles"
    assert result[field] == ["A", "B"]


@pytest.mark.parametrize("build", BUILDS.values(), ids=list(BUILDS))
async def test_a_field_no_element_produces_fails_at_run_time_naming_it(build: Any, mode: str) -> None:
    with pytest.raises(ContractError) as info:
        await call(stageflow.SequentialPipeline([build("headline")]), mode, texts=["a", "b"])
    assert info.value.field == "headline"
    assert info.value.code == "missing_output"
    assert "'title'" in info.value.message  # what the element did produce


def test_a_fully_declared_pipeline_is_still_checked_when_built() -> None:
    declared = stageflow.SequentialPipeline([stageflow.stage(lambda text: {"n": len(text)}, writes=["n"])])
    with pytest.raises(ConfigurationError, match="collect names \\['title'\\]"):
        stageflow.ForEach(declared, over="texts", item="text", collect={"title": "titles"})


def test_without_collect_an_undeclared_pipeline_asks_for_it() -> None:
    with pytest.raises(ConfigurationError, match="collect="):
        stageflow.ForEach(stageflow.SequentialPipeline([Ext()]), over="texts", item="text")


async def test_the_hint_for_a_single_returned_field_is_a_collect_mapping_that_works(mode: str) -> None:
    # User report: collect="titles" over a custom module returning `title` failed with a hint that
    # did not say collect={'title': 'titles'} works.
    build = BUILDS["module"]
    with pytest.raises(ContractError) as info:
        await call(stageflow.SequentialPipeline([build("titles")]), mode, texts=["a", "b"])
    assert "collect={'title': 'titles'}" in (info.value.hint or "")
    result = await call(stageflow.SequentialPipeline([build({"title": "titles"})]), mode, texts=["a", "b"])
    assert result.titles == ["A", "B"]
