"""Every test runs with isolated DSPy settings and no disk cache (stageflow's own pytest plugin)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _dspy_isolation(stageflow_dspy: None) -> None:
    """Apply the plugin's ``stageflow_dspy`` fixture to every test."""


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Every test that takes ``mode`` runs twice: once sync, once async (see ``stageflow.testing.call``)."""
    return str(request.param)
