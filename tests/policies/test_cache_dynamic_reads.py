"""A stage that looks module-level names up at run time (``globals()[name]``, ``vars()``, ``eval``,
``exec``) reads values no fingerprint can hold: the cache and batch runs say so, instead of serving
an old output silently after such a value changed."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import dspy
import pytest

import stageflow
from stageflow._fp_dynamic import dynamic_reads
from stageflow.policies.cache import CacheWarning

RATE = 2


def by_globals(x: int) -> dict[str, int]:
    return {"y": x * globals()["RATE"]}


def by_eval(x: int) -> dict[str, int]:
    return {"y": x * eval("RATE")}


def helper(x: int) -> int:
    return x * int(globals()["RATE"])


def through_a_helper(x: int) -> dict[str, int]:
    return {"y": helper(x)}


def by_name(x: int) -> dict[str, int]:
    return {"y": x * RATE}


class Module(dspy.Module):  # type: ignore[misc]
    def forward(self, x: int) -> dspy.Prediction:
        return dspy.Prediction(y=x * eval("RATE"))


@pytest.mark.parametrize(
    ("fn", "named"),
    [(by_globals, "by_globals"), (by_eval, "by_eval"), (through_a_helper, "helper")],
    ids=["globals", "eval", "helper"],
)
def test_the_cache_warns_once_naming_the_function(fn: Any, named: str) -> None:
    stage = stageflow.CachedStage(stageflow.stage(fn, writes=["y"]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [stage(x=3)["y"], stage(x=3)["y"]]
    assert outputs == [6, 6]
    said = [str(w.message) for w in caught if w.category is CacheWarning and "at run time" in str(w.message)]
    assert len(said) == 1
    assert f"{named}()" in said[0]


def test_a_module_class_of_yours_is_looked_into() -> None:
    assert dynamic_reads(Module()) == ["Module.forward"]


def test_names_read_directly_need_no_warning() -> None:
    stage = stageflow.CachedStage(stageflow.stage(by_name, writes=["y"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert stage(x=3)["y"] == 6
    assert dynamic_reads(by_name) == []


def test_a_module_that_defines_its_own_globals_name_is_not_flagged() -> None:
    space: dict[str, Any] = {"globals": lambda: {"RATE": 5}}
    exec("def f(x):\n    return x * globals()['RATE']\n", space)
    assert dynamic_reads(space["f"]) == []


def test_a_batch_run_warns_that_a_resume_cannot_see_those_values(tmp_path: Path) -> None:
    pipeline = stageflow.SequentialPipeline([stageflow.stage(by_globals, writes=["y"])])
    with pytest.warns(UserWarning, match="batch journal cannot tell"):
        summary = stageflow.run_batch(
            pipeline, [{"id": "a", "x": 10}], journal=tmp_path / "j", progress=False
        )
    assert [r.outputs for r in summary.rows()] == [{"y": 20}]
