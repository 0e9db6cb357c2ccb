"""The ``>>>`` examples of the budget modules (and the error and pipeline methods they add) run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "stageflow.budgets.ledger",
    "stageflow.budgets.ratelimit",
    "stageflow.budgets.scope",
    "stageflow.budgets.spec",
    "stageflow.errors",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0


def test_set_budget_example() -> None:
    from stageflow.patterns import base

    finder = doctest.DocTestFinder()
    tests = [t for t in finder.find(base.Pipeline.set_budget, "set_budget", globs={}) if t.examples]
    assert tests
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0
