"""IterativePipeline: stopping conditions, limits, no state between calls, result details."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dspy
import pytest

from stageflow import (
    ConfigurationError,
    ContractError,
    IterativePipeline,
    LoopLimitError,
    QualityBasedStopping,
    Stage,
    StageError,
    StopDecision,
    stage,
)
from stageflow.testing import Counter, FakeLM, call


def scorer(scores: Sequence[float], improvements: Sequence[float] | None = None) -> Any:
    """A stateless stage: iteration ``count`` (from the state) picks the score; pure, so reruns repeat."""
    writes = ["count", "quality_score"] + (["improvement"] if improvements is not None else [])

    @stage(writes=writes)
    def step(count: int = 0) -> dict[str, Any]:
        i = min(count, len(scores) - 1)
        out: dict[str, Any] = {"count": count + 1, "quality_score": scores[i]}
        if improvements is not None:
            out["improvement"] = improvements[min(count, len(improvements) - 1)]
        return out

    return step


async def test_quality_threshold_stops(mode: str) -> None:
    loop = IterativePipeline(
        [scorer([0.2, 0.5, 0.95, 0.99])], QualityBasedStopping(0.9, patience=5), max_iterations=10
    )
    result = await call(loop, mode)
    assert result.converged is True
    assert result.stop_reason == "quality_threshold"
    assert result.num_iterations == 3
    assert [snap["quality_score"] for snap in result.iterations] == [0.2, 0.5, 0.95]
    assert result.quality_score == 0.95


async def test_plateau_from_score_deltas(mode: str) -> None:
    loop = IterativePipeline(
        [scorer([0.1, 0.5, 0.5, 0.5, 0.5])], QualityBasedStopping(0.9, patience=2), max_iterations=10
    )
    result = await call(loop, mode)
    assert result.converged is True
    assert result.stop_reason == "plateau"
    # iteration 3: delta 0 (1 stalled), iteration 4: delta 0 (2 stalled) -> stop
    assert result.num_iterations == 4


def test_plateau_needs_consecutive_stalls() -> None:
    # stall, gain, stall, stall -> the plateau is only reached at the second consecutive stall
    loop = IterativePipeline(
        [scorer([0.1, 0.5, 0.5, 0.6, 0.6, 0.6, 0.7])],
        QualityBasedStopping(0.9, patience=2),
        max_iterations=10,
    )
    result = loop()
    assert (result.stop_reason, result.num_iterations) == ("plateau", 6)


async def test_plateau_patience_one(mode: str) -> None:
    loop = IterativePipeline(
        [scorer([0.1, 0.4, 0.4])], QualityBasedStopping(0.9, patience=1), max_iterations=10
    )
    result = await call(loop, mode)
    assert (result.stop_reason, result.num_iterations) == ("plateau", 3)


async def test_plateau_from_improvement_field_overrides_deltas(mode: str) -> None:
    # Scores keep rising (deltas > 0), but the stage reports no improvement from iteration 2 on.
    step = scorer([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], improvements=[0.5, 0.0, 0.0, 0.0])
    loop = IterativePipeline([step], QualityBasedStopping(0.9, patience=2), max_iterations=10)
    result = await call(loop, mode)
    assert result.stop_reason == "plateau"
    assert result.num_iterations == 3


async def test_rising_scores_without_improvement_field_do_not_plateau(mode: str) -> None:
    loop = IterativePipeline(
        [scorer([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])], QualityBasedStopping(0.9, patience=2), max_iterations=5
    )
    result = await call(loop, mode)
    assert result.converged is False
    assert result.stop_reason == "max_iterations"
    assert result.num_iterations == 5


def test_min_improvement_counts_small_gains_as_stalled() -> None:
    scores = [0.1, 0.15, 0.2, 0.25, 0.3]
    strict = IterativePipeline(
        [scorer(scores)], QualityBasedStopping(0.9, patience=2, min_improvement=0.1), max_iterations=10
    )
    lenient = IterativePipeline([scorer(scores)], QualityBasedStopping(0.9, patience=2), max_iterations=5)
    assert (strict().stop_reason, strict().num_iterations) == ("plateau", 3)
    assert lenient().stop_reason == "max_iterations"


def test_quality_based_stopping_custom_score_field() -> None:
    step = stage(lambda n=0: {"n": n + 1, "q": (n + 1) * 0.5}, writes=["n", "q"])
    result = IterativePipeline([step], QualityBasedStopping(1.0, score_field="q"), max_iterations=10)()
    assert (result.num_iterations, result.stop_reason) == (2, "quality_threshold")


def test_quality_based_stopping_decision_is_pure() -> None:
    cond = QualityBasedStopping(0.9, patience=2)
    history = [{"quality_score": 0.5}, {"quality_score": 0.5}, {"quality_score": 0.5}]
    assert cond(history[-1], history) == StopDecision(True, "plateau")
    assert cond(history[-1], history) == StopDecision(True, "plateau")
    assert cond({"quality_score": 0.5}, history[:1]) == StopDecision(False)
    assert cond({"quality_score": 0.95}, []) == StopDecision(True, "quality_threshold")


@pytest.mark.parametrize("patience", [0, -1, 1.5, None])
def test_quality_based_stopping_bad_patience(patience: Any) -> None:
    with pytest.raises(ConfigurationError) as ei:
        QualityBasedStopping(patience=patience)
    assert ei.value.field == "patience"


async def test_no_state_leaks_between_calls(mode: str) -> None:
    loop = IterativePipeline(
        [scorer([0.1, 0.5, 0.5, 0.5])], QualityBasedStopping(0.9, patience=2), max_iterations=10
    )
    first = await call(loop, mode)
    second = await call(loop, mode)
    assert first.num_iterations == second.num_iterations == 4
    assert first.iterations == second.iterations
    assert first.stop_reason == second.stop_reason == "plateau"
    assert len(first.trace) == len(second.trace) == 4


async def test_no_state_leaks_between_calls_with_lm_stage(mode: str) -> None:
    lm = FakeLM({"draft": lambda i: i["previous"] + "+"})
    refine = Stage(dspy.Predict("previous -> draft"), inputs={"previous": "draft"})

    def good_enough(state: Mapping[str, Any]) -> bool:
        return len(state["draft"]) >= 4

    loop = IterativePipeline([refine], good_enough, max_iterations=10)
    with dspy.context(lm=lm):
        first = await call(loop, mode, draft="x")
        calls_first = lm.calls
        second = await call(loop, mode, draft="x")
    assert first.draft == second.draft == "x+++"
    assert first.num_iterations == second.num_iterations == 3
    assert lm.calls == 2 * calls_first == 6


async def test_iteration_snapshots_are_independent(mode: str) -> None:
    loop = IterativePipeline([scorer([0.1, 0.2, 0.3])], lambda s: s["count"] >= 3, max_iterations=10)
    result = await call(loop, mode)
    assert [snap["count"] for snap in result.iterations] == [1, 2, 3]
    assert result.iterations[0] is not result.iterations[1]
    assert "iterations" not in list(result.keys())
    assert "converged" not in list(result.keys())
    assert list(result.keys()) == ["count", "quality_score"]
    assert result.stop_reason == "condition"
    assert result.converged is True


async def test_max_iterations_reached_returns_not_converged(mode: str) -> None:
    counter = Counter("n")
    loop = IterativePipeline([counter.as_stage()], lambda s: False, max_iterations=4)
    result = await call(loop, mode)
    assert result.converged is False
    assert result.stop_reason == "max_iterations"
    assert result.num_iterations == 4
    assert counter.n == 4
    assert result.n == 4
    assert [r.path for r in result.trace] == ["stages[0]"] * 4


async def test_on_limit_raise(mode: str) -> None:
    counter = Counter("n")
    loop = IterativePipeline([counter.as_stage()], lambda s: False, max_iterations=3, on_limit="raise")
    with pytest.raises(LoopLimitError) as ei:
        await call(loop, mode)
    assert ei.value.code == "loop_limit"
    assert "max_iterations=3" in str(ei.value)
    assert counter.n == 3


@pytest.mark.parametrize("bad", [0, -2, None, True, False, 2.0, "3"])
def test_invalid_max_iterations(bad: Any) -> None:
    with pytest.raises(ConfigurationError) as ei:
        IterativePipeline([Counter().as_stage()], lambda s: True, max_iterations=bad)
    assert ei.value.field == "max_iterations"
    assert ei.value.code == "bad_option"


def test_invalid_on_limit_and_condition_and_stages() -> None:
    with pytest.raises(ConfigurationError) as ei:
        IterativePipeline([Counter().as_stage()], lambda s: True, on_limit="ignore")  # type: ignore[arg-type]
    assert ei.value.field == "on_limit"
    with pytest.raises(ConfigurationError) as ei:
        IterativePipeline([Counter().as_stage()], "stop")  # type: ignore[arg-type]
    assert ei.value.field == "stopping_condition"
    with pytest.raises(ConfigurationError) as ei:
        IterativePipeline([], lambda s: True)
    assert ei.value.code == "bad_stages"


async def test_condition_reading_unwritten_field_fails_before_running(mode: str) -> None:
    counter = Counter("n")
    loop = IterativePipeline([counter.as_stage()], QualityBasedStopping(0.9), max_iterations=3)
    with pytest.raises(ContractError) as ei:
        await call(loop, mode)
    assert ei.value.field == "quality_score"
    assert ei.value.stage_path == "stopping_condition"
    assert ei.value.code == "missing_input"
    assert counter.n == 0


def test_condition_with_reads_attribute_is_checked() -> None:
    class NeedsVerdict:
        reads = ("verdict",)

        def __call__(self, state: Mapping[str, Any]) -> bool:
            return bool(state["verdict"])

    counter = Counter("n")
    loop = IterativePipeline([counter.as_stage()], NeedsVerdict())
    with pytest.raises(ContractError) as ei:
        loop()
    assert ei.value.field == "verdict"
    assert counter.n == 0
    # Given as an input, the field is available.
    assert loop(verdict=True).num_iterations == 1


async def test_one_arg_callable_conditions(mode: str) -> None:
    class AtThree:
        def __call__(self, state: Mapping[str, Any]) -> bool:
            return state["count"] >= 3

    def at_two(state: Mapping[str, Any]) -> bool:
        return state["count"] >= 2

    step = scorer([0.1])
    assert (await call(IterativePipeline([step], AtThree(), max_iterations=10), mode)).num_iterations == 3
    assert (await call(IterativePipeline([step], at_two, max_iterations=10), mode)).num_iterations == 2
    lam = IterativePipeline([step], lambda s: s["count"] >= 4, max_iterations=10)
    assert (await call(lam, mode)).num_iterations == 4


async def test_two_arg_condition_gets_history(mode: str) -> None:
    seen: list[int] = []

    def cond(state: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> bool:
        seen.append(len(history))
        assert history[-1]["count"] == state["count"]
        return len(history) >= 3

    result = await call(IterativePipeline([scorer([0.1])], cond, max_iterations=10), mode)
    assert seen == [1, 2, 3]
    assert result.num_iterations == 3


async def test_condition_returning_stop_decision(mode: str) -> None:
    loop = IterativePipeline(
        [scorer([0.1])], lambda s: StopDecision(s["count"] == 2, "enough"), max_iterations=5
    )
    result = await call(loop, mode)
    assert (result.num_iterations, result.stop_reason, result.converged) == (2, "enough", True)


async def test_condition_raising_is_stage_error(mode: str) -> None:
    def cond(state: Mapping[str, Any]) -> bool:
        raise ZeroDivisionError("nope")

    with pytest.raises(StageError) as ei:
        await call(IterativePipeline([scorer([0.1])], cond), mode)
    assert ei.value.stage_path == "stopping_condition"
    assert isinstance(ei.value.__cause__, ZeroDivisionError)


def test_non_numeric_score_is_contract_error() -> None:
    step = stage(lambda: {"quality_score": "high"}, writes=["quality_score"])
    with pytest.raises(ContractError) as ei:
        IterativePipeline([step], QualityBasedStopping())()
    assert ei.value.code == "bad_score"
    assert ei.value.field == "quality_score"


async def test_state_carries_over_between_iterations(mode: str) -> None:
    lm = FakeLM({"draft": lambda i: i["previous"] + "!", "quality_score": lambda i: len(i["draft"]) / 4})
    loop = IterativePipeline(
        [
            Stage(dspy.Predict("previous -> draft"), inputs={"previous": "draft"}),
            dspy.Predict("draft -> quality_score: float"),
        ],
        QualityBasedStopping(1.0, patience=3),
        max_iterations=10,
    )
    with dspy.context(lm=lm):
        result = await call(loop, mode, draft="ab")
    assert result.draft == "ab!!"
    assert result.quality_score == 1.0
    assert result.num_iterations == 2
    assert [r.path for r in result.trace] == ["stages[0]", "stages[1]"] * 2
