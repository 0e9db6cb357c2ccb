"""Tutorial "Design Principles" §3 "Caching and Memoization": ``CachedStage``.

The tutorial's ``CachedStage(underlying_stage, cache_size=1000)`` keys the cache on the call's
keyword arguments (order-independent: ``json.dumps(kwargs, sort_keys=True)``), returns the stored
result on a hit (the same object a miss returned), counts ``cache_hits`` / ``cache_misses``, and
``get_cache_stats()`` returns ``{'hits', 'misses', 'hit_rate', 'cache_size'}``. Its eviction is
FIFO although it says LRU; stageflow's must be a true LRU. ``acall`` must cache too.
"""

from __future__ import annotations

import dspy

from stageflow import CachedStage, SequentialPipeline
from stageflow.testing import FakeLM, call


# User code: an expensive LM stage worth caching.
class Summarize(dspy.Module):
    def __init__(self):
        super().__init__()
        self.summarize = dspy.Predict("content, style -> summary")

    def forward(self, content, style="short"):
        return self.summarize(content=content, style=style)


def summary_lm() -> FakeLM:
    return FakeLM({"summary": lambda i: f"{i['style']} summary of {i['content']}"})


def test_a_repeated_call_is_a_hit_and_the_stats_count_it() -> None:
    lm = summary_lm()
    stage = CachedStage(Summarize(), cache_size=1000)
    with dspy.context(lm=lm):
        miss = stage(content="rivers", style="short")
        hit = stage(style="short", content="rivers")  # keyword order does not matter
    assert lm.calls == 1
    assert hit["summary"] == miss["summary"] == "short summary of rivers"
    stats = stage.get_cache_stats()
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (1, 1, 0.5)
    assert len(stage.cache) == 1  # the tutorial reads its cache's size with len()


def test_the_cache_is_a_true_lru() -> None:
    lm = summary_lm()
    stage = CachedStage(Summarize(), cache_size=2)
    with dspy.context(lm=lm):
        for text in ["a", "b", "a", "c", "a"]:  # 'a' is used again before 'c' arrives: 'b' is evicted
            stage(content=text)
    assert [inputs["content"] for _, inputs in lm.log] == ["a", "b", "c"]


async def test_in_a_pipeline_repeated_inputs_hit_the_cache(mode: str) -> None:
    lm = summary_lm()
    cached = CachedStage(Summarize(), cache_size=2)
    pipeline = SequentialPipeline([cached])
    with dspy.context(lm=lm):
        results = [await call(pipeline, mode, content=text) for text in ["a", "b", "a", "c", "b"]]
    assert [r.summary for r in results] == [f"short summary of {t}" for t in "abacb"]
    assert [inputs["content"] for _, inputs in lm.log] == ["a", "b", "c", "b"]
    assert cached.get_cache_stats()["hits"] == 1


def test_a_hit_returns_the_same_type_as_a_miss() -> None:
    stage = CachedStage(Summarize())
    with dspy.context(lm=summary_lm()):
        miss = stage(content="rivers")
        hit = stage(content="rivers")
    assert type(hit) is type(miss)
    assert hit.summary == miss.summary


async def test_acall_uses_the_cache() -> None:
    lm = summary_lm()
    stage = CachedStage(Summarize())
    with dspy.context(lm=lm):
        await stage.acall(content="rivers")
        await stage.acall(content="rivers")
    assert lm.calls == 1
    assert stage.get_cache_stats()["hits"] == 1


def test_cache_hits_and_misses_are_attributes() -> None:
    stage = CachedStage(Summarize())
    with dspy.context(lm=summary_lm()):
        stage(content="rivers")
        stage(content="rivers")
    assert (stage.cache_hits, stage.cache_misses) == (1, 1)


def test_the_stats_report_the_cache_size() -> None:
    stage = CachedStage(Summarize())
    with dspy.context(lm=summary_lm()):
        stage(content="a")
        stage(content="b")
    assert stage.get_cache_stats()["cache_size"] == 2


def test_the_constructor_arguments_are_kept_as_attributes() -> None:
    inner = Summarize()
    stage = CachedStage(inner, cache_size=10)
    assert stage.underlying_stage is inner
    assert stage.cache_size == 10
