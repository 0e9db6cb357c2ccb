"""Tutorial §3 "Iterative/Loop Architecture": ``IterativePipeline`` and ``QualityBasedStopping``.

The tutorial's loop runs ``processing_stages`` over one state, calls
``stopping_condition(current_state, iteration)`` (``iteration`` an ``int`` from 0) after each pass,
stops at ``max_iterations``, and returns ``final_state``, ``iterations`` (``{'iteration', 'state',
'should_stop'}`` per pass) and ``converged``. ``QualityBasedStopping(quality_threshold=0.9,
patience=2)`` stops when ``quality_score >= quality_threshold`` or when ``improvement < 0.01`` for
``patience`` consecutive iterations; either field may be absent. stageflow must keep no stopping
state between calls (the tutorial's ``patience_counter`` leaks from one run into the next).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import dspy
import pytest

from stageflow import IterativePipeline, QualityBasedStopping
from stageflow.testing import FakeLM, call


# User code: a refine step and a judge, as the tutorial's diagram has them (Stage 1 → Stage 2 → condition).
class Refine(dspy.Module):
    def __init__(self):
        super().__init__()
        self.improve = dspy.Predict("draft -> revised")

    def forward(self, draft):
        return dspy.Prediction(draft=self.improve(draft=draft).revised)


class Judge(dspy.Module):
    def __init__(self):
        super().__init__()
        self.judge = dspy.Predict("draft -> quality_score: float")

    def forward(self, draft, quality_score=0.0):
        new = self.judge(draft=draft).quality_score
        return dspy.Prediction(quality_score=new, improvement=new - quality_score)


def loop_lm(scores: Sequence[float]) -> FakeLM:
    """Each revision appends '+'; the judge scores a draft by its number of revisions (pure, so
    concurrent runs cannot disturb each other)."""
    return FakeLM(
        {
            "revised": lambda i: i["draft"] + "+",
            "quality_score": lambda i: scores[min(i["draft"].count("+"), len(scores)) - 1],
        }
    )


async def test_the_condition_is_called_with_the_state_and_an_int_iteration(mode: str) -> None:
    calls: list[tuple[dict[str, object], int]] = []

    def enough_revisions(state, iteration):
        calls.append((dict(state), iteration))
        return state["draft"].count("+") >= 3

    pipeline = IterativePipeline([Refine(), Judge()], enough_revisions, max_iterations=5)
    with dspy.context(lm=loop_lm([0.1, 0.2, 0.3, 0.4, 0.5])):
        result = await call(pipeline, mode, draft="d")
    assert [iteration for _, iteration in calls] == [0, 1, 2]
    assert all(type(iteration) is int for _, iteration in calls)
    assert calls[0][0]["draft"] == "d+"
    assert result.converged is True
    assert result.final_state["draft"] == "d+++"
    assert result.draft == "d+++"
    assert [it["iteration"] for it in result.iterations] == [0, 1, 2]
    assert [it["should_stop"] for it in result.iterations] == [False, False, True]
    # Each entry keeps the state of its own iteration (the tutorial's current_state.copy()).
    assert [it["state"]["draft"] for it in result.iterations] == ["d+", "d++", "d+++"]
    for detail in ("final_state", "iterations", "converged"):
        assert detail not in result


async def test_max_iterations_bounds_the_loop_and_converged_is_false(mode: str) -> None:
    pipeline = IterativePipeline([Refine(), Judge()], lambda state, iteration: False, max_iterations=3)
    with dspy.context(lm=loop_lm([0.1])):
        result = await call(pipeline, mode, draft="d")
    assert result.converged is False
    assert len(result.iterations) == 3
    assert result.final_state["draft"] == "d+++"


async def test_quality_based_stopping_stops_at_the_threshold(mode: str) -> None:
    pipeline = IterativePipeline(
        [Refine(), Judge()], QualityBasedStopping(quality_threshold=0.9, patience=2), max_iterations=5
    )
    with dspy.context(lm=loop_lm([0.5, 0.7, 0.92, 0.95])):
        result = await call(pipeline, mode, draft="d")
    assert result.converged is True
    assert [it["state"]["quality_score"] for it in result.iterations] == [0.5, 0.7, 0.92]
    assert result.final_state["quality_score"] == 0.92


async def test_quality_based_stopping_stops_after_patience_iterations_without_improvement(mode: str) -> None:
    pipeline = IterativePipeline(
        [Refine(), Judge()], QualityBasedStopping(quality_threshold=0.9, patience=2), max_iterations=8
    )
    # improvements: 0.5, 0.1, 0.005 (stall 1), 0.095 (reset), 0.004 (stall 1), 0.003 (stall 2: stop)
    with dspy.context(lm=loop_lm([0.5, 0.6, 0.605, 0.7, 0.704, 0.707, 0.8])):
        result = await call(pipeline, mode, draft="d")
    assert result.converged is True
    assert len(result.iterations) == 6
    assert [it["should_stop"] for it in result.iterations] == [False] * 5 + [True]


async def test_either_field_may_be_absent(mode: str) -> None:
    class ImprovementOnly(dspy.Module):
        def forward(self, draft):
            return dspy.Prediction(draft=draft + "+", improvement=0.001)

    class ScoreOnly(dspy.Module):
        def forward(self, draft):
            return dspy.Prediction(draft=draft + "+", quality_score=0.1 * (len(draft)))

    stop = QualityBasedStopping(quality_threshold=0.9, patience=2)
    plateau = IterativePipeline([ImprovementOnly()], stop, max_iterations=5)
    result = await call(plateau, mode, draft="d")
    assert (result.converged, len(result.iterations)) == (True, 2)

    threshold = IterativePipeline([ScoreOnly()], stop, max_iterations=20)
    result = await call(threshold, mode, draft="d")
    assert result.converged is True
    assert result.final_state["quality_score"] >= 0.9
    assert result.final_state["draft"] == "d" + "+" * 9

    neither = IterativePipeline([Refine()], stop, max_iterations=3)
    with dspy.context(lm=loop_lm([0.0])):
        result = await call(neither, mode, draft="d")
    assert (result.converged, len(result.iterations)) == (False, 3)


async def test_quality_based_stopping_keeps_no_state_between_calls(mode: str) -> None:
    class Stalled(dspy.Module):
        def forward(self, draft):
            return dspy.Prediction(draft=draft + "+", improvement=0.0)

    # One QualityBasedStopping, several calls: each call counts its own stalled iterations. (The
    # tutorial's patience_counter would carry over and stop later calls after one iteration.)
    pipeline = IterativePipeline([Stalled()], QualityBasedStopping(patience=3), max_iterations=10)
    first = await call(pipeline, mode, draft="a")
    second = await call(pipeline, mode, draft="b")
    assert len(first.iterations) == len(second.iterations) == 3


async def test_concurrent_calls_share_the_stopping_condition_without_interfering() -> None:
    pipeline = IterativePipeline(
        [Refine(), Judge()], QualityBasedStopping(quality_threshold=0.9, patience=2), max_iterations=8
    )
    lm = loop_lm([0.5, 0.6, 0.605, 0.609, 0.95])
    with dspy.context(lm=lm):
        results = await asyncio.gather(*(pipeline.acall(draft=f"d{n}") for n in range(4)))
    assert [len(r.iterations) for r in results] == [4] * 4
    assert [r.final_state["draft"] for r in results] == [f"d{n}++++" for n in range(4)]


def test_quality_based_stopping_called_by_hand_as_in_the_tutorial() -> None:
    stop = QualityBasedStopping(quality_threshold=0.9, patience=2)
    assert (stop.quality_threshold, stop.patience, stop.patience_counter) == (0.9, 2, 0)
    assert stop({"quality_score": 0.95}, 0)
    assert not stop({"quality_score": 0.5}, 0)
    assert not stop({"improvement": 0.001}, 0)
    assert stop({"improvement": 0.001}, 1)
    assert not stop({"improvement": 0.001}, 0)  # iteration 0: a new run counts from zero
    assert not stop({"improvement": 0.5}, 1)  # an improvement resets the count
    assert not stop({"improvement": 0.001}, 2)
    assert stop({"improvement": 0.001}, 3)
    assert not stop({}, 0)


@pytest.mark.parametrize("patience", [1, 2, 4])
async def test_patience_is_the_number_of_consecutive_stalled_iterations(mode: str, patience: int) -> None:
    class Stalled(dspy.Module):
        def forward(self, draft):
            return dspy.Prediction(draft=draft + "+", improvement=0.009)

    pipeline = IterativePipeline([Stalled()], QualityBasedStopping(patience=patience), max_iterations=10)
    result = await call(pipeline, mode, draft="d")
    assert (result.converged, len(result.iterations)) == (True, patience)
