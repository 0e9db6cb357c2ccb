"""Every test runs with isolated DSPy settings and no disk cache (stageflow's own pytest plugin)."""

from __future__ import annotations

import os

import pytest

# DSPy's price table comes from LiteLLM, which otherwise fetches it from the network first (and
# retries for seconds on a machine without one): the bundled table, as stageflow.lm.select sets it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


@pytest.fixture(autouse=True)
def _dspy_isolation(stageflow_dspy: None) -> None:
    """Apply the plugin's ``stageflow_dspy`` fixture to every test."""


@pytest.fixture(params=["sync", "async"])
def mode(request: pytest.FixtureRequest) -> str:
    """Every test that takes ``mode`` runs twice: once sync, once async (see ``stageflow.testing.call``)."""
    return str(request.param)
