"""Every test runs with isolated DSPy settings and no disk cache (stageflow's own pytest plugin)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _dspy_isolation(stageflow_dspy: None) -> Iterator[None]:
    yield
