"""The ``>>>`` examples in the fast adapter modules run and give what they show."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "stageflow.lm.fast",
    "stageflow.lm.fast.adapters",
    "stageflow.lm.fast.call",
    "stageflow.lm.fast.twin",
    "stageflow.lm.fast._format",
    "stageflow.lm.fast._stats",
    "stageflow.lm.fast._values",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
