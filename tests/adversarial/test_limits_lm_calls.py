"""``stageflow.limits(N)`` caps LM calls made inside a stage too (r_limits_1).

Before the fix, ``limits(2)`` capped leaf stage calls only: a custom module stage that fanned out
with ``dspy.Parallel(num_threads=6)`` made 6 LM calls at once, and so did a bare ``dspy.Parallel``
inside the block. LM calls now take slots of their own (a separate semaphore per cap), so a stage
holding a stage slot while its inner calls wait for LM slots cannot deadlock.
"""

from __future__ import annotations

import threading
from typing import Any

import dspy

import stageflow
from stageflow.testing import FakeLM, call


class FanOut(dspy.Module):  # type: ignore[misc]
    """A custom module stage that makes ``n`` LM calls at once with dspy.Parallel."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n
        self.p = dspy.Predict("question -> out")

    def forward(self, question: str) -> dspy.Prediction:
        jobs = [(self.p, {"question": f"{question}{k}"}) for k in range(self.n)]
        results = dspy.Parallel(num_threads=self.n, disable_progress_bar=True)(jobs)
        return dspy.Prediction(outs=[r.out for r in results])


async def test_lm_calls_inside_a_custom_module_stage_are_capped(mode: str) -> None:
    lm = FakeLM({"out": "o"}, latency=0.05)
    pipeline = stageflow.SequentialPipeline([stageflow.Stage(FanOut(6), writes=["outs"])])
    with dspy.context(lm=lm), stageflow.limits(2):
        result = await call(pipeline, mode, question="q")
    assert result.outs == ["o"] * 6
    assert lm.calls == 6
    assert lm.peak_active == 2


def test_a_bare_dspy_parallel_inside_limits_is_capped() -> None:
    lm = FakeLM({"out": "o"}, latency=0.05)
    jobs = [(dspy.Predict("question -> out"), {"question": f"q{k}"}) for k in range(6)]
    with dspy.context(lm=lm), stageflow.limits(2):
        results = dspy.Parallel(num_threads=6, disable_progress_bar=True)(jobs)
    assert [r.out for r in results] == ["o"] * 6
    assert lm.peak_active == 2


def test_stages_holding_every_slot_still_finish_their_inner_calls() -> None:
    """Both stage slots are held by stages whose LM calls wait: they get LM slots, not stage slots."""
    lm = FakeLM({"out": "o"}, latency=0.02)
    each = stageflow.ForEach(
        stageflow.Stage(FanOut(3), writes=["outs"]), over="questions", item="question", max_concurrency=4
    )
    pipeline = stageflow.SequentialPipeline([each])
    box: dict[str, Any] = {}

    def run() -> None:
        with dspy.context(lm=lm), stageflow.limits(2) as budget:
            box["result"] = pipeline(questions=["a", "b", "c", "d"])
            box["stage_peak"] = budget.peak

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "deadlock: the run did not finish"
    assert [len(outs) for outs in box["result"].outs_list] == [3, 3, 3, 3]
    assert box["stage_peak"] == 2
    assert lm.peak_active == 2
    assert lm.calls == 12


async def test_predictor_stages_in_a_foreach_are_capped(mode: str) -> None:
    lm = FakeLM({"out": "o"}, latency=0.02)
    each = stageflow.ForEach(dspy.Predict("question -> out"), over="questions", item="question")
    with dspy.context(lm=lm), stageflow.limits(3):
        await call(stageflow.SequentialPipeline([each]), mode, questions=[str(i) for i in range(12)])
    assert lm.calls == 12
    assert lm.peak_active == 3
