"""pytest plugin (registered on install): stageflow's test fixtures in any project.

Fixtures:

- ``stageflow_dspy``: the test runs with DSPy's disk cache off (memory cache off too) and DSPy's
  settings restored afterwards — use it (or wrap it in an ``autouse`` fixture of your own) in every
  test that configures DSPy.
- ``fake_lm``: a factory for :class:`stageflow.testing.FakeLM` (``fake_lm({"answer": "42"})``).

Nothing is imported until a fixture is used, so the plugin costs nothing in projects that do not
use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = ["fake_lm", "stageflow_dspy"]


@pytest.fixture
def stageflow_dspy() -> Iterator[None]:
    """Isolate DSPy settings and turn its caches off for one test."""
    from stageflow.testing import isolated_dspy

    with isolated_dspy():
        yield


@pytest.fixture
def fake_lm() -> Callable[..., Any]:
    """Build a :class:`stageflow.testing.FakeLM`: ``fake_lm(responses, latency=..., ...)``."""
    from stageflow.testing import FakeLM

    return FakeLM
