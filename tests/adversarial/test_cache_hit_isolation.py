"""Issue 9 / issue 8, caching: a hit returns the same type as a miss and shares no mutable object.

Today a hit returns a dict where the miss returned a ``dspy.Prediction``, and every hit hands out
the same list: ``first.y.append(99)`` changes what every later hit returns.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import dspy
import numpy as np
import pydantic

from stageflow import CachedStage, SequentialPipeline, Stage, stage
from stageflow.testing import FakeLM, call


async def test_a_hit_in_a_pipeline_shares_no_list_with_the_caller_or_other_hits(mode: str) -> None:
    p = SequentialPipeline([CachedStage(stage(lambda x: {"y": [x, {"deep": [x]}]}, writes=["y"]))])
    first = await call(p, mode, x=1)
    first.y.append(99)
    first.y[1]["deep"].append(99)
    second = await call(p, mode, x=1)
    assert second.y == [1, {"deep": [1]}]
    second.y.append(7)
    third = await call(p, mode, x=1)
    assert third.y == [1, {"deep": [1]}]
    assert [e.kind for e in third.run.events] == ["cache_hit"]


async def test_the_stages_own_later_mutation_does_not_reach_the_cache(mode: str) -> None:
    kept: list[list[int]] = []

    def remember(x: int) -> dict[str, Any]:
        out = [x]
        kept.append(out)  # the stage keeps a reference and changes it after returning
        return {"y": out}

    p = SequentialPipeline([CachedStage(stage(remember, writes=["y"]))])
    await call(p, mode, x=1)
    kept[0].append(42)
    assert (await call(p, mode, x=1)).y == [1]


async def test_a_standalone_hit_shares_nothing(mode: str) -> None:
    cached = CachedStage(stage(lambda x: {"y": [x]}, writes=["y"]))
    first = await call(cached, mode, x=1)
    first["y"].append(99)
    assert (await call(cached, mode, x=1))["y"] == [1]
    assert cached.get_cache_stats()["hits"] == 1


class Answer(pydantic.BaseModel):
    text: str
    tags: list[str]


@dataclasses.dataclass
class Box:
    items: list[int]


async def test_hit_and_miss_have_the_same_type_standalone(mode: str) -> None:
    lm = FakeLM({"answer": "A"})
    pred = CachedStage(dspy.Predict("question -> answer"))
    as_dict = CachedStage(stage(lambda x: {"y": x}, writes=["y"]))
    as_model = CachedStage(stage(lambda x: Answer(text=x, tags=[x])))
    as_dataclass = CachedStage(stage(lambda x: Box([x]), writes=["box"]))
    as_array = CachedStage(stage(lambda x: np.arange(x), writes=["arr"]))
    with dspy.context(lm=lm):
        for cached, kw in [
            (pred, {"question": "q"}),
            (as_dict, {"x": "v"}),
            (as_model, {"x": "v"}),
            (as_dataclass, {"x": 3}),
            (as_array, {"x": 3}),
        ]:
            miss = await call(cached, mode, **kw)
            hit = await call(cached, mode, **kw)
            assert type(hit) is type(miss), cached
            assert hit is not miss
            assert cached.get_cache_stats()["hits"] == 1, cached
    assert lm.calls == 1
    hit_model = await call(as_model, mode, x="v")
    hit_model.tags.append("changed")
    assert (await call(as_model, mode, x="v")).tags == ["v"]
    hit_box = await call(as_dataclass, mode, x=3)
    hit_box.items.append(9)
    assert (await call(as_dataclass, mode, x=3)).items == [3]
    hit_array = await call(as_array, mode, x=3)
    hit_array[0] = 100
    assert (await call(as_array, mode, x=3)).tolist() == [0, 1, 2]


async def test_hit_and_miss_have_the_same_type_in_a_pipeline(mode: str) -> None:
    lm = FakeLM({"answer": "A"})
    p = SequentialPipeline(
        [
            CachedStage(dspy.Predict("question -> answer")),
            CachedStage(stage(lambda answer: {"n": len(answer)}, writes=["n"])),
            CachedStage(stage(lambda answer: len(answer) * 2, writes=["twice"])),
            CachedStage(stage(lambda answer: Answer(text=answer, tags=[]))),
        ]
    )
    with dspy.context(lm=lm):
        miss = await call(p, mode, question="q")
        hit = await call(p, mode, question="q")
    assert [e.kind for e in hit.run.events] == ["cache_hit"] * 4
    for path, out in miss.stage_outputs.items():
        assert type(hit.stage_outputs[path]) is type(out), path
    assert isinstance(hit.stage_outputs["stages[0]"], dspy.Prediction)
    assert (hit.answer, hit.n, hit.twice, hit.text) == ("A", 1, 2, "A")


async def test_a_renamed_prediction_keeps_its_type_on_a_hit(mode: str) -> None:
    lm = FakeLM({"answer": "A"})
    cached = CachedStage(Stage(dspy.Predict("question -> answer"), outputs={"answer": "reply"}))
    with dspy.context(lm=lm):
        miss = await call(cached, mode, question="q")
        hit = await call(cached, mode, question="q")
    assert type(hit) is type(miss) is dspy.Prediction
    assert hit.reply == "A"
