"""The tutorial's ``CachedStage`` ("Caching and Memoization"), used as the tutorial's readers use it.

The tutorial writes ``CachedStage(underlying_stage, cache_size=1000)``, calls it with keyword
inputs, reads ``cache_hits`` / ``cache_misses`` and ``get_cache_stats()`` with the keys ``hits``,
``misses``, ``hit_rate`` and ``cache_size``. Issue 8 adds: a hit returns what a miss returns, and
``acall`` caches.
"""

from __future__ import annotations

import dspy
import pytest

from stageflow import CachedStage, SequentialPipeline
from stageflow.testing import FakeLM, call


async def test_the_tutorials_usage_runs_as_written(mode: str) -> None:
    lm = FakeLM({"answer": lambda i: "A:" + i["question"]})
    underlying_stage = dspy.Predict("question -> answer")
    cached = CachedStage(underlying_stage, cache_size=1000)
    with dspy.context(lm=lm):
        results = [await call(cached, mode, question=q) for q in ("a", "a", "b", "a")]
    assert [r.answer for r in results] == ["A:a", "A:a", "A:b", "A:a"]
    assert all(type(r) is dspy.Prediction for r in results)  # a hit is what a miss is
    assert (cached.cache_hits, cached.cache_misses, cached.cache_size) == (2, 2, 1000)
    stats = cached.get_cache_stats()
    assert {k: stats[k] for k in ("hits", "misses", "hit_rate", "cache_size")} == {
        "hits": 2,
        "misses": 2,
        "hit_rate": 0.5,
        "cache_size": 2,  # entries held, as the tutorial's len(self.cache)
    }
    assert lm.calls == 2
    assert cached.underlying_stage is underlying_stage


def test_cache_size_bounds_entries_least_recently_used_first() -> None:
    lm = FakeLM({"answer": lambda i: i["question"]})
    cached = CachedStage(dspy.Predict("question -> answer"), cache_size=2)
    with dspy.context(lm=lm):
        for q in ("a", "b", "a", "c", "a", "b"):
            cached(question=q)
    # a, b stored; a used; c evicts b (least recently used); a hits; b misses again
    assert (cached.cache_hits, cached.cache_misses) == (2, 4)
    assert cached.get_cache_stats()["cache_size"] == 2


async def test_inside_a_pipeline_the_stats_count_pipeline_calls(mode: str) -> None:
    lm = FakeLM({"answer": "A"})
    cached = CachedStage(dspy.Predict("question -> answer"), cache_size=10)
    p = SequentialPipeline([cached])
    with dspy.context(lm=lm):
        for _ in range(3):
            await call(p, mode, question="q")
    assert (cached.cache_hits, cached.cache_misses) == (2, 1)
    assert cached.get_cache_stats()["hit_rate"] == pytest.approx(2 / 3)
