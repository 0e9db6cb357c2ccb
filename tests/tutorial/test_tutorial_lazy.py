"""Tutorial "Performance Optimization" §2 "Lazy Evaluation": ``LazyStage``, ``LazyResult``.

The tutorial's ``LazyStage(underlying_stage)`` is a ``dspy.Module`` whose call returns a
``LazyResult(stage, kwargs)`` without running anything; ``get_result()`` runs the stage on first
use and keeps the result, ``predictions`` gives the result's fields, and any other attribute is
read from the result. stageflow adds: the stage runs exactly once even under concurrent access,
in the DSPy context of the moment it was called.
"""

from __future__ import annotations

import asyncio
import threading

import dspy

from stageflow import LazyResult, LazyStage, SequentialPipeline
from stageflow.testing import FakeLM, call


class Research(dspy.Module):
    def __init__(self):
        super().__init__()
        self.research = dspy.ChainOfThought("question -> findings")

    def forward(self, question):
        return self.research(question=question)


def research_lm() -> FakeLM:
    return FakeLM({"findings": lambda i: f"findings on {i['question']}"})


def test_calling_a_lazy_stage_defers_the_work_until_an_attribute_is_read() -> None:
    lm = research_lm()
    lazy = LazyStage(Research())
    with dspy.context(lm=lm):
        pending = lazy(question="tides")
        assert isinstance(pending, LazyResult)
        assert lm.calls == 0
        assert pending.findings == "findings on tides"
        assert pending.reasoning == "ok"
    assert lm.calls == 1  # evaluated once, then kept


def test_the_deferred_call_uses_the_dspy_context_it_was_made_in() -> None:
    lm = research_lm()
    with dspy.context(lm=lm):
        pending = LazyStage(Research())(question="tides")
    assert pending.findings == "findings on tides"  # read outside the block: still that LM
    assert lm.calls == 1


def test_concurrent_readers_run_the_stage_once() -> None:
    lm = research_lm()
    with dspy.context(lm=lm):
        pending = LazyStage(Research())(question="tides")
    seen: list[str] = []
    threads = [threading.Thread(target=lambda: seen.append(pending.findings)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == ["findings on tides"] * 8
    assert lm.calls == 1


def test_get_result_forces_the_evaluation_once() -> None:
    lm = research_lm()
    with dspy.context(lm=lm):
        pending = LazyStage(Research())(question="tides")
        first = pending.get_result()
        again = pending.get_result()
    assert first is again
    assert first.findings == "findings on tides"
    assert lm.calls == 1


def test_predictions_gives_the_results_fields() -> None:
    with dspy.context(lm=research_lm()):
        pending = LazyStage(Research())(question="tides")
        assert pending.predictions == {"reasoning": "ok", "findings": "findings on tides"}


def test_a_lazy_stage_is_a_dspy_module() -> None:
    lazy = LazyStage(Research())
    assert isinstance(lazy, dspy.Module)
    assert [name for name, _ in lazy.named_predictors()] == ["underlying_stage.research.predict"]


async def test_acall_on_a_lazy_stage() -> None:
    lm = research_lm()
    with dspy.context(lm=lm):
        pending = await LazyStage(Research()).acall(question="tides")
        assert await asyncio.to_thread(lambda: pending.findings) == "findings on tides"
    assert lm.calls == 1


async def test_a_lazy_stage_in_a_pipeline(mode: str) -> None:
    pipeline = SequentialPipeline([LazyStage(Research()), dspy.Predict("findings -> summary")])
    with dspy.context(lm=research_lm()):
        result = await call(pipeline, mode, question="tides")
    assert result.findings == "findings on tides"
    assert result.summary == "ok"
