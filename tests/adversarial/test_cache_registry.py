"""Issue 9, caching: the fingerprint registry holds no strong references.

Today 400 pipelines whose stages close over 1 MB each stay alive after ``gc.collect()``, because
the registry keeps every fingerprinted object (to keep its ``id()`` from being reused).
"""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from typing import Any

import dspy

import stageflow
from stageflow import CachedStage, SequentialPipeline, Stage
from stageflow.testing import FakeLM


class Blob:
    """1 MB of state a stage closes over (weak-referenceable, so the test can watch it die)."""

    def __init__(self) -> None:
        self.data = bytearray(1_000_000)


def make_pipeline(i: int) -> tuple[SequentialPipeline, Blob]:
    blob = Blob()
    payload = bytes(1_000_000)

    def body(x: int) -> dict[str, Any]:
        return {"y": x + len(blob.data) + len(payload) + i}

    return SequentialPipeline([CachedStage(Stage(body, writes=["y"]), cache_size=4)]), blob


def test_fingerprinted_pipelines_and_their_closures_are_freed() -> None:
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    refs: list[weakref.ref[Any]] = []
    for i in range(400):
        p, blob = make_pipeline(i)
        assert p(x=1).y == 2_000_001 + i
        stageflow.fingerprint(p)
        refs.append(weakref.ref(blob))
        refs.append(weakref.ref(p))
        del p, blob
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert sum(r() is not None for r in refs) == 0
    assert grown < 20_000_000  # 400 pipelines × 2 MB would be 800 MB


def test_fingerprinted_predictors_and_lms_are_freed() -> None:
    refs: list[weakref.ref[Any]] = []
    # DSPy's process-wide default trace list keeps every predictor it ran; turn it off here.
    with dspy.context(trace=None):
        _predictor_round(refs)
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


def _predictor_round(refs: list[weakref.ref[Any]]) -> None:
    for _ in range(50):
        pred = dspy.Predict("question -> answer")
        pred.lm = FakeLM({"answer": "a"})
        pred.demos = [dspy.Example(question="x" * 10_000, answer="y")]
        p = SequentialPipeline([CachedStage(pred)])
        p(question="q")
        stageflow.fingerprint(p)
        refs.extend([weakref.ref(pred), weakref.ref(pred.lm), weakref.ref(p)])
        del pred, p
