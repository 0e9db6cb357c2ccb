"""The ``>>>`` examples in the observe modules run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "stageflow.observe._json",
    "stageflow.observe.graph.model",
    "stageflow.observe.graph.render",
    "stageflow.observe.graph.walk",
    "stageflow.observe.report",
    "stageflow.observe.report.spans",
    "stageflow.observe.report.svg",
    "stageflow.observe.tracer",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
