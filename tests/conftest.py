"""Shared fixtures: every test runs with isolated DSPy settings and no disk cache."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from stageflow.testing import isolated_dspy


@pytest.fixture(autouse=True)
def _dspy_isolation() -> Iterator[None]:
    with isolated_dspy():
        yield
