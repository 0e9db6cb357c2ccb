"""Issue 9 / issue 8, caching: ``CachedStage.acall`` caches (today it never does)."""

from __future__ import annotations

import asyncio

import dspy

import stageflow
from stageflow import CachedStage, SequentialPipeline, stage
from stageflow.testing import FakeLM


async def test_acall_on_its_own_caches() -> None:
    lm = FakeLM({"answer": "A"})
    cached = CachedStage(dspy.Predict("question -> answer"))
    with dspy.context(lm=lm):
        first = await cached.acall(question="q")
        second = await cached.acall(question="q")
    assert first.answer == second.answer == "A"
    assert lm.calls == 1
    assert (cached.cache_hits, cached.cache_misses) == (1, 1)


async def test_sync_and_async_share_one_cache() -> None:
    calls: list[int] = stageflow.untracked([])
    cached = CachedStage(stage(lambda x: calls.append(x) or {"y": x}, writes=["y"]))
    assert cached(x=1)["y"] == 1
    assert (await cached.acall(x=1))["y"] == 1
    assert (await asyncio.gather(*(cached.acall(x=2) for _ in range(1))))[0]["y"] == 2
    assert cached(x=2)["y"] == 2
    assert calls == [1, 2]


async def test_acall_inside_a_pipeline_caches() -> None:
    lm = FakeLM({"answer": "A"})
    p = SequentialPipeline([CachedStage(dspy.Predict("question -> answer"))])
    with dspy.context(lm=lm):
        await p.acall(question="q")
        r = await p.acall(question="q")
    assert lm.calls == 1
    assert [e.kind for e in r.run.events] == ["cache_hit"]


async def test_acall_does_not_cache_while_traces_are_collected() -> None:
    lm = FakeLM({"answer": "A"})
    pred = dspy.Predict("question -> answer")
    cached = CachedStage(pred)
    with dspy.context(lm=lm):
        await cached.acall(question="q")
        with dspy.context(trace=[]):
            await cached.acall(question="q")
            trace = list(dspy.settings.trace)
    assert lm.calls == 2
    assert [t[0] for t in trace] == [pred]
