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
    assert [it["state"]["quality_score"] for it in result.iterations] == [0.2, 0.5, 0.95]
    assert [it["iteration"] for it in result.iterations] == [0, 1, 2]
    assert [it["should_stop"] for it in result.iterations] == [False, False, True]
    assert result.quality_score == 0.95
    assert result.final_state["quality_score"] == 0.95


async def test_flat_scores_without_an_improvement_field_never_plateau(mode: str) -> None:
    # As in the tutorial, only the improvement field counts towards patience, not score deltas.
    loop = IterativePipeline(
        [scorer([0.1, 0.5, 0.5, 0.5, 0.5])], QualityBasedStopping(0.9, patience=2), max_iterations=6
    )
    result = await call(loop, mode)
    assert (result.converged, result.stop_reason, result.num_iterations) == (False, "max_iterations", 6)


async def test_plateau_after_patience_consecutive_small_improvements(mode: str) -> None:
    # improvement < 0.01 for `patience` consecutive iterations stops the loop.
    step = scorer([0.1, 0.2, 0.3, 0.4, 0.5, 0.6], improvements=[0.5, 0.005, 0.0, 0.3])
    loop = IterativePipeline([step], QualityBasedStopping(0.9, patience=2), max_iterations=10)
    result = await call(loop, mode)
    assert result.stop_reason == "plateau"
    assert result.num_iterations == 3


def test_a_large_improvement_resets_the_patience_count() -> None:
    step = scorer([0.1] * 8, improvements=[0.0, 0.5, 0.0, 0.2, 0.0, 0.0])
    result = IterativePipeline([step], QualityBasedStopping(0.9, patience=2), max_iterations=10)()
    assert (result.stop_reason, result.num_iterations) == ("plateau", 6)


async def test_plateau_patience_one(mode: str) -> None:
    step = scorer([0.1, 0.4, 0.4], improvements=[0.3, 0.001])
    loop = IterativePipeline([step], QualityBasedStopping(0.9, patience=1), max_iterations=10)
    result = await call(loop, mode)
    assert (result.stop_reason, result.num_iterations) == ("plateau", 2)


async def test_either_field_may_be_absent(mode: str) -> None:
    only_improvement = stage(lambda n=0: {"n": n + 1, "improvement": 0.0}, writes=["n", "improvement"])
    only_score = stage(lambda n=0: {"n": n + 1, "quality_score": 0.1}, writes=["n", "quality_score"])
    neither = stage(lambda n=0: {"n": n + 1}, writes=["n"])
    cond = QualityBasedStopping(0.9, patience=2)
    assert (await call(IterativePipeline([only_improvement], cond), mode)).stop_reason == "plateau"
    assert (await call(IterativePipeline([only_score], cond, max_iterations=3), mode)).num_iterations == 3
    assert (await call(IterativePipeline([neither], cond, max_iterations=3), mode)).converged is False


def test_min_improvement_sets_what_counts_as_a_stall() -> None:
    step = scorer([0.1] * 6, improvements=[0.05, 0.05, 0.05])
    strict = IterativePipeline([step], QualityBasedStopping(0.9, patience=2, min_improvement=0.1))
    default = IterativePipeline([step], QualityBasedStopping(0.9, patience=2), max_iterations=5)
    assert (strict().stop_reason, strict().num_iterations) == ("plateau", 2)
    assert default().stop_reason == "max_iterations"


def test_quality_based_stopping_custom_score_field() -> None:
    step = stage(lambda n=0: {"n": n + 1, "q": (n + 1) * 0.5}, writes=["n", "q"])
    result = IterativePipeline([step], QualityBasedStopping(1.0, score_field="q"), max_iterations=10)()
    assert (result.num_iterations, result.stop_reason) == (2, "quality_threshold")


def test_quality_based_stopping_is_called_as_in_the_tutorial() -> None:
    cond = QualityBasedStopping(quality_threshold=0.9, patience=2)
    # condition(state, iteration): the tutorial's call; stalls are counted, restarting at iteration 0.
    assert not cond({"improvement": 0.001}, 0)
    assert cond({"improvement": 0.001}, 1)
    assert not cond({"improvement": 0.001}, 0)  # a new run: the count restarted
    assert cond({"quality_score": 0.95}, 0) == StopDecision(True, "quality_threshold")


def test_quality_based_stopping_with_history_is_pure() -> None:
    cond = QualityBasedStopping(0.9, patience=2)
    history = [{"improvement": 0.0}, {"improvement": 0.0}]
    assert cond(history[-1], 1, history) == StopDecision(True, "plateau")
    assert cond(history[-1], 1, history) == StopDecision(True, "plateau")
    assert cond(history[0], 0, history[:1]) == StopDecision(False)


@pytest.mark.parametrize("patience", [0, -1, 1.5, None, True])
def test_quality_based_stopping_bad_patience(patience: Any) -> None:
    with pytest.raises(ConfigurationError) as ei:
        QualityBasedStopping(patience=patience)
    assert ei.value.field == "patience"


@pytest.mark.parametrize("threshold", ["high", float("nan"), None])
def test_quality_based_stopping_bad_threshold(threshold: Any) -> None:
    with pytest.raises(ConfigurationError) as ei:
        QualityBasedStopping(quality_threshold=threshold)
    assert ei.value.field == "quality_threshold"


async def test_no_state_leaks_between_calls(mode: str) -> None:
    step = scorer([0.1, 0.5, 0.5, 0.5], improvements=[0.4, 0.0, 0.0])
    loop = IterativePipeline([step], QualityBasedStopping(0.9, patience=2), max_iterations=10)
    first = await call(loop, mode)
    second = await call(loop, mode)
    assert first.num_iterations == second.num_iterations == 3
    assert first.iterations == second.iterations
    assert first.stop_reason == second.stop_reason == "plateau"
    assert len(first.trace) == len(second.trace) == 3


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
    assert [it["state"]["count"] for it in result.iterations] == [1, 2, 3]
    assert result.iterations[0]["state"] is not result.iterations[1]["state"]
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


async def test_two_arg_condition_gets_the_iteration_number(mode: str) -> None:
    seen: list[int] = []

    def cond(state: Mapping[str, Any], iteration: int) -> bool:
        seen.append(iteration)
        return iteration >= 2

    result = await call(IterativePipeline([scorer([0.1])], cond, max_iterations=10), mode)
    assert seen == [0, 1, 2]
    assert result.num_iterations == 3


async def test_conditions_can_ask_for_the_history(mode: str) -> None:
    seen: list[tuple[int, int]] = []

    def three(state: Mapping[str, Any], iteration: int, history: Sequence[Mapping[str, Any]]) -> bool:
        seen.append((iteration, len(history)))
        assert history[-1]["count"] == state["count"]
        return len(history) >= 2

    def keyword(state: Mapping[str, Any], *, history: Sequence[Mapping[str, Any]]) -> bool:
        return len(history) >= 3

    assert (await call(IterativePipeline([scorer([0.1])], three), mode)).num_iterations == 2
    assert seen == [(0, 1), (1, 2)]
    assert (await call(IterativePipeline([scorer([0.1])], keyword), mode)).num_iterations == 3


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
