"""The ``>>>`` examples in the observe modules (and ``stageflow.usage``) run and print what they say."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "stageflow.observe._json",
    "stageflow.observe.graph.model",
    "stageflow.observe.graph.render",
    "stageflow.observe.graph.walk",
    "stageflow.observe.otel",
    "stageflow.observe.otel_attributes",
    "stageflow.observe.profile_table",
    "stageflow.observe.profiler",
    "stageflow.observe.redact",
    "stageflow.observe.report",
    "stageflow.observe.report.spans",
    "stageflow.observe.report.svg",
    "stageflow.observe.schedule",
    "stageflow.observe.tracer",
    "stageflow.usage",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
