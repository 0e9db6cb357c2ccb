"""pytest plugin (registered on install): stageflow's test fixtures in any project.

Fixtures:

- ``stageflow_dspy``: the test runs with DSPy's disk cache off (memory cache off too) and DSPy's
  settings restored afterwards — use it (or wrap it in an ``autouse`` fixture of your own) in every
  test that configures DSPy.
- ``fake_lm``: a factory for :class:`stageflow.testing.FakeLM` (``fake_lm({"answer": "42"})``).
- ``stageflow_local_lm``: the embedded local model (loaded once per session, DSPy cache off).
  Without llama-cpp-python or the model it skips the test — except under CI (``CI`` set), where a
  missing model is a failure, so integration tests cannot silently stop running.

Nothing is imported until a fixture is used, so the plugin costs nothing in projects that do not
use it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

__all__ = ["fake_lm", "stageflow_dspy", "stageflow_local_lm"]


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


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the embedded model is required under CI: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def stageflow_local_lm() -> Any:
    """The embedded SmolLM2 model as a ``dspy.LM`` (cache off), loaded once per test session."""
    if importlib.util.find_spec("llama_cpp") is None:
        _unavailable("llama-cpp-python is not installed (pip install 'stageflow[local]')")
    from stageflow.errors import ConfigurationError
    from stageflow.lm import make_local_lm

    try:
        lm = make_local_lm(cache=False)
        lm.engine.load()
    except ConfigurationError as exc:
        _unavailable(f"embedded model unavailable: {exc}")
    return lm
