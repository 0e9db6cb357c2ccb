"""Issue 9, caching: keys are type-exact and canonical; objects are keyed by content, never by repr.

Each test is a reproducer: two inputs that are different values must never share a cache entry
(the second call would get the first call's output — a silent wrong result).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import dspy
import numpy as np
import pydantic
import pytest

import stageflow
from stageflow import CachedStage, SequentialPipeline, stage
from stageflow.policies.cache import CacheWarning
from stageflow.testing import call


def type_echo() -> tuple[SequentialPipeline, list[Any]]:
    """A cached stage whose output depends on the exact type and value of its input."""
    seen: list[Any] = stageflow.untracked([])

    def describe(x: Any) -> dict[str, Any]:
        seen.append(x)
        return {"y": f"{type(x).__name__}:{x!r}"}

    return SequentialPipeline([CachedStage(stage(describe, writes=["y"]))]), seen


DIFFERENT = [
    pytest.param(1, True, id="1-True"),
    pytest.param(1, 1.0, id="1-1.0"),
    pytest.param(True, 1.0, id="True-1.0"),
    pytest.param(0, False, id="0-False"),
    pytest.param(0.0, -0.0, id="0.0--0.0"),
    pytest.param({"a": 1}, [["a", 1]], id="dict-pairs"),
    pytest.param({"a": 1}, [("a", 1)], id="dict-tuple-pairs"),
    pytest.param({1: "x"}, {"1": "x"}, id="int-key-str-key"),
    pytest.param({True: "x"}, {1: "x"}, id="bool-key-int-key"),
    pytest.param((1, 2), [1, 2], id="tuple-list"),
    pytest.param("ab", b"ab", id="str-bytes"),
    pytest.param([{"a": (1,)}], [{"a": [1]}], id="nested-tuple-list"),
    pytest.param([[1, True]], [[1, 1]], id="nested-bool-int"),
    pytest.param({"k": {1: 1.0}}, {"k": {1: 1}}, id="nested-float-int"),
    pytest.param(None, "None", id="None-str"),
    pytest.param({1, 2}, [1, 2], id="set-list"),
    pytest.param(frozenset({1}), {1}, id="frozenset-set"),
    pytest.param(["a", "b"], "['a', 'b']", id="list-its-repr"),
]


@pytest.mark.parametrize(("first", "second"), DIFFERENT)
async def test_different_values_never_share_an_entry(mode: str, first: Any, second: Any) -> None:
    p, seen = type_echo()
    a = await call(p, mode, x=first)
    b = await call(p, mode, x=second)
    assert a.y == f"{type(first).__name__}:{first!r}"
    assert b.y == f"{type(second).__name__}:{second!r}"
    assert len(seen) == 2


async def test_equal_values_share_an_entry(mode: str) -> None:
    p, seen = type_echo()
    for _ in range(2):
        await call(p, mode, x={"a": [1, (2, 3)], "b": {4: b"x"}})
        await call(p, mode, x={5, 6})
    assert len(seen) == 2


def big_arrays() -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros(10_000)
    b = np.zeros(10_000)
    b[5_000] = 1.0  # the middle is elided from repr: repr(a) == repr(b)
    assert repr(a) == repr(b)
    return a, b


async def test_numpy_arrays_with_the_same_repr_are_different_inputs(mode: str) -> None:
    a, b = big_arrays()
    calls: list[float] = stageflow.untracked([])

    def total(x: Any) -> dict[str, Any]:
        calls.append(float(x.sum()))
        return {"y": float(x.sum())}

    p = SequentialPipeline([CachedStage(stage(total, writes=["y"]))])
    assert (await call(p, mode, x=a)).y == 0.0
    assert (await call(p, mode, x=b)).y == 1.0
    assert (await call(p, mode, x=a.astype(np.float32))).y == 0.0  # another dtype: another entry
    assert (await call(p, mode, x=a.reshape(100, 100))).y == 0.0  # another shape: another entry
    assert (await call(p, mode, x=a.copy())).y == 0.0  # same content: a hit
    assert len(calls) == 4


class Query(pydantic.BaseModel):
    text: str
    limit: int


class OtherQuery(pydantic.BaseModel):
    text: str
    limit: int


@dataclasses.dataclass
class Point:
    x: Any
    y: Any


async def test_pydantic_models_are_keyed_by_class_and_content(mode: str) -> None:
    p, seen = type_echo()
    await call(p, mode, x=Query(text="t", limit=1))
    await call(p, mode, x=Query(text="t", limit=2))
    await call(p, mode, x=OtherQuery(text="t", limit=1))
    await call(p, mode, x=Query(text="t", limit=1))
    assert [type(s).__name__ for s in seen] == ["Query", "Query", "OtherQuery"]


async def test_dataclasses_are_keyed_by_class_and_fields(mode: str) -> None:
    p, seen = type_echo()
    await call(p, mode, x=Point(1, 2))
    await call(p, mode, x=Point(1, True))
    await call(p, mode, x=Point(1, [2]))
    await call(p, mode, x=Point(1, 2))
    assert len(seen) == 3


async def test_dspy_examples_are_keyed_by_content(mode: str) -> None:
    p, seen = type_echo()
    await call(p, mode, x=dspy.Example(q="a", a="1"))
    await call(p, mode, x=dspy.Example(q="a", a="2"))
    await call(p, mode, x=dspy.Prediction(q="a", a="1"))
    await call(p, mode, x=dspy.Example(q="a", a="1").with_inputs("q"))
    await call(p, mode, x=dspy.Example(q="a", a="1"))
    assert len(seen) == 4


class Opaque:
    """No canonical encoding and no public state: its repr is all a naive key could use."""

    def __init__(self, secret: int) -> None:
        self.__secret = secret

    def __repr__(self) -> str:
        return "<Opaque>"


async def test_an_unkeyable_input_is_not_cached_and_warns_once_naming_stage_and_field(mode: str) -> None:
    calls: list[int] = stageflow.untracked([])

    def use(obj: Any) -> dict[str, Any]:
        calls.append(1)
        return {"y": len(calls)}

    p = SequentialPipeline([CachedStage(stage(use, writes=["y"]))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [(await call(p, mode, obj=Opaque(i))).y for i in (1, 1, 2)]
    assert ys == [1, 2, 3]  # every call ran: never a hit keyed by "<Opaque>"
    mine = [w for w in caught if issubclass(w.category, CacheWarning)]
    assert len(mine) == 1
    text = str(mine[0].message)
    assert "stages[0]" in text
    assert "'obj'" in text
    assert "Opaque" in text


async def test_a_cyclic_input_is_not_cached(mode: str) -> None:
    loop: list[Any] = []
    loop.append(loop)
    calls: list[int] = stageflow.untracked([])
    p = SequentialPipeline([CachedStage(stage(lambda x: calls.append(1) or {"y": len(calls)}, writes=["y"]))])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)
        assert (await call(p, mode, x=loop)).y == 1
        assert (await call(p, mode, x=loop)).y == 2
