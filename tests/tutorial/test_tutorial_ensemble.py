"""Tutorial "Advanced Architectural Patterns" §1 "Ensemble Architecture": ``EnsemblePipeline``,
``ResultAggregator``.

The tutorial's ensemble runs every processor on the same input, records ``{'processor_id',
'result', 'success'}`` (or ``'error'``) per processor, raises ``PipelineError("All processors
failed")`` when none succeeds, and returns ``aggregated_result`` (``aggregator.aggregate(successful)``)
and ``individual_results``. ``ResultAggregator(strategy='weighted_voting')`` sums each member's
``confidence`` (0.5 when absent) per ``content`` and returns ``{'content': best, 'confidence':
share}``; ``best_confidence`` and ``consensus`` are named but not shown. stageflow runs the members
concurrently.
"""

from __future__ import annotations

from typing import Any

import dspy
import pytest

from stageflow import ConfigurationError, EnsemblePipeline, PipelineError, ResultAggregator
from stageflow.testing import FakeLM, call


# User code: processors that answer with content and a confidence.
class Expert(dspy.Module):
    def __init__(self, persona):
        super().__init__()
        self.persona = persona
        self.answer = dspy.Predict("question, persona -> content, confidence: float")

    def forward(self, question):
        return self.answer(question=question, persona=self.persona)


class Broken(dspy.Module):
    def forward(self, question):
        raise RuntimeError("model overloaded")


ANSWERS = {"geographer": ("Paris", 0.9), "historian": ("Rome", 0.6), "tourist": ("paris", 0.3)}


def experts_lm(**options: Any) -> FakeLM:
    return FakeLM(
        {
            "content": lambda i: ANSWERS[i["persona"]][0],
            "confidence": lambda i: ANSWERS[i["persona"]][1],
        },
        **options,
    )


def experts() -> list[Expert]:
    return [Expert(persona) for persona in ANSWERS]


async def test_weighted_voting_as_in_the_tutorial(mode: str) -> None:
    pipeline = EnsemblePipeline(experts(), ResultAggregator(strategy="weighted_voting"))
    with dspy.context(lm=experts_lm()):
        result = await call(pipeline, mode, question="What is the capital of France?")
    # 'Paris' (0.9) and 'paris' (0.3) vote together against 'Rome' (0.6): 1.2 of 1.8.
    assert result.aggregated_result == {"content": "Paris", "confidence": pytest.approx(1.2 / 1.8)}
    assert (result.content, result.confidence) == ("Paris", pytest.approx(1.2 / 1.8))
    records = result.individual_results
    assert [r["processor_id"] for r in records] == [0, 1, 2]
    assert [r["success"] for r in records] == [True, True, True]
    assert [r["result"].content for r in records] == ["Paris", "Rome", "paris"]
    for detail in ("aggregated_result", "individual_results"):
        assert detail not in result


@pytest.mark.parametrize(
    ("strategy", "content", "confidence"),
    [
        ("weighted_voting", "Paris", 1.2 / 1.8),
        ("best_confidence", "Paris", 0.9),
        ("consensus", "Paris", 2 / 3),
    ],
)
async def test_every_strategy_the_tutorial_names(
    mode: str, strategy: str, content: str, confidence: float
) -> None:
    pipeline = EnsemblePipeline(experts(), ResultAggregator(strategy=strategy))
    with dspy.context(lm=experts_lm()):
        result = await call(pipeline, mode, question="What is the capital of France?")
    assert result.aggregated_result == {"content": content, "confidence": pytest.approx(confidence)}


async def test_the_default_aggregator_votes_on_content(mode: str) -> None:
    pipeline = EnsemblePipeline(experts(), ResultAggregator())
    with dspy.context(lm=experts_lm()):
        result = await call(pipeline, mode, question="Q")
    assert result.content == "Paris"
    assert ResultAggregator().strategy == "weighted_voting"


async def test_members_run_concurrently(mode: str) -> None:
    lm = experts_lm(rendezvous=3, rendezvous_timeout=10.0)
    pipeline = EnsemblePipeline(experts(), ResultAggregator())
    with dspy.context(lm=lm):
        await call(pipeline, mode, question="Q")
    assert lm.peak_active == 3


async def test_a_failed_processor_is_recorded_and_left_out(mode: str) -> None:
    pipeline = EnsemblePipeline([*experts(), Broken()], ResultAggregator(strategy="best_confidence"))
    with dspy.context(lm=experts_lm()):
        result = await call(pipeline, mode, question="Q")
    failed = result.individual_results[3]
    assert (failed["processor_id"], failed["success"]) == (3, False)
    assert "model overloaded" in str(failed["error"])
    assert result.aggregated_result == {"content": "Paris", "confidence": 0.9}


async def test_all_processors_failing_is_a_pipeline_error(mode: str) -> None:
    pipeline = EnsemblePipeline([Broken(), Broken()], ResultAggregator())
    with pytest.raises(PipelineError) as info:
        await call(pipeline, mode, question="Q")
    assert "model overloaded" in str(info.value)


def test_aggregate_is_called_as_the_tutorial_calls_it() -> None:
    # EnsemblePipeline.forward in the tutorial: self.aggregator.aggregate(successful_results)
    successful_results = [
        {"processor_id": 0, "result": dspy.Prediction(content="Paris", confidence=0.9), "success": True},
        {"processor_id": 1, "result": dspy.Prediction(content="Rome", confidence=0.6), "success": True},
        {
            "processor_id": 2,
            "result": dspy.Prediction(content="Paris"),
            "success": True,
        },  # no confidence: 0.5
    ]
    aggregator = ResultAggregator(strategy="weighted_voting")
    assert aggregator.aggregate(successful_results) == {
        "content": "Paris",
        "confidence": pytest.approx(1.4 / 2.0),
    }


def test_an_unknown_strategy_is_refused() -> None:
    # The tutorial raises ValueError when aggregate() runs; stageflow refuses it at construction.
    with pytest.raises(ConfigurationError) as info:
        ResultAggregator(strategy="loudest")
    assert "weighted_voting" in str(info.value)


# -- an aggregator of your own, the tutorial's way (helper 91: its aggregate() was silently ignored) --


class Fixed(dspy.Module):
    def __init__(self, content: str, confidence: float) -> None:
        super().__init__()
        self.content, self.confidence = content, confidence

    def forward(self, question: str) -> dspy.Prediction:
        return dspy.Prediction(content=self.content, confidence=self.confidence)


class LongestAnswer(ResultAggregator):
    """The tutorial's subclass shape: ``aggregate(self, results)`` over the successful records."""

    def aggregate(self, results):  # type: ignore[no-untyped-def,override]
        best = max(results, key=lambda r: len(r["result"].content))
        return {"content": best["result"].content, "confidence": 1.0, "from": best["processor_id"]}


async def test_an_aggregator_subclass_of_yours_decides(mode: str) -> None:
    pipeline = EnsemblePipeline([Fixed("Paris", 0.9), Broken(), Fixed("Paris, France", 0.2)], LongestAnswer())
    result = await call(pipeline, mode, question="Q")
    assert result.aggregated_result == {"content": "Paris, France", "confidence": 1.0, "from": 2}
    assert result.content == "Paris, France"  # (not the weighted vote's 'Paris')
    assert result.run.extras["strategy"] == "LongestAnswer.aggregate"


async def test_any_object_with_aggregate_is_an_aggregator(mode: str) -> None:
    class Duck:
        def aggregate(self, results):  # type: ignore[no-untyped-def]
            return dspy.Prediction(content=" / ".join(r["result"].content for r in results))

    pipeline = EnsemblePipeline([Fixed("a", 0.5), Fixed("b", 0.5)], Duck())
    assert (await call(pipeline, mode, question="Q")).content == "a / b"


def test_an_aggregate_of_yours_returning_no_fields_is_a_clear_error() -> None:
    class Text(ResultAggregator):
        def aggregate(self, results):  # type: ignore[no-untyped-def,override]
            return "Paris"

    with pytest.raises(PipelineError, match=r"Text\.aggregate\(\) returned str") as info:
        EnsemblePipeline([Fixed("a", 0.5), Fixed("b", 0.5)], Text())(question="Q")
    assert info.value.code == "bad_aggregate"


def test_quorum_needs_stageflows_aggregator() -> None:
    class Duck:
        def aggregate(self, results):  # type: ignore[no-untyped-def]
            return {}

    with pytest.raises(ConfigurationError, match="quorum"):
        EnsemblePipeline([Fixed("a", 0.5), Fixed("b", 0.5)], Duck(), quorum=1)
    with pytest.raises(ConfigurationError, match=r"aggregate\(results\)"):
        EnsemblePipeline([Fixed("a", 0.5), Fixed("b", 0.5)], object())


def test_an_aggregator_of_yours_is_drawn_by_its_name() -> None:
    from stageflow.observe.graph import to_mermaid

    assert "LongestAnswer.aggregate()" in to_mermaid(EnsemblePipeline([Fixed("a", 0.5)], LongestAnswer()))


# -- helper 92: the tutorial's aggregator as written, combine() of yours, errors --------------------


class TutorialAggregator:
    """The tutorial's ``ResultAggregator`` (its weighted voting), as its readers copy it."""

    def __init__(self, strategy="weighted_voting"):  # type: ignore[no-untyped-def]
        self.strategy = strategy

    def aggregate(self, results):  # type: ignore[no-untyped-def]
        votes = {}
        for r in results:
            output = r["result"]
            if hasattr(output, "predictions"):
                content = output.predictions.get("content", "")
            else:
                content = str(output)
            confidence = getattr(output, "confidence", 0.5)
            votes[content] = votes.get(content, 0) + confidence
        best_content = max(votes, key=votes.get)
        return {"content": best_content, "confidence": votes[best_content] / sum(votes.values())}


async def test_the_tutorials_own_aggregator_votes_on_the_members_content(mode: str) -> None:
    pipeline = EnsemblePipeline(
        [Fixed("Paris", 0.9), Fixed("Rome", 0.6), Fixed("Paris", 0.5)], TutorialAggregator()
    )
    result = await call(pipeline, mode, question="Q")
    assert result.content == "Paris"  # (not a Prediction's repr)
    assert result.confidence == pytest.approx(1.4 / 2.0)


async def test_a_combine_of_yours_may_return_the_fields_or_fields_and_details(mode: str) -> None:
    class Pair:
        def combine(self, members):  # type: ignore[no-untyped-def]
            return {"content": members[-1]["content"]}, {"strategy": "last"}

    class Fields(ResultAggregator):
        def combine(self, members):  # type: ignore[no-untyped-def,override]
            return {"content": members[0]["content"]}

    members = [Fixed("a", 0.5), Fixed("b", 0.5)]
    last = await call(EnsemblePipeline(members, Pair()), mode, question="Q")
    assert (last.content, last.run.extras["strategy"]) == ("b", "last")
    assert (await call(EnsemblePipeline(members, Fields()), mode, question="Q")).content == "a"


def test_a_subclass_with_aggregate_and_combine_aggregates() -> None:
    class Both(ResultAggregator):
        def aggregate(self, results):  # type: ignore[no-untyped-def,override]
            return {"content": "from aggregate"}

        def combine(self, members):  # type: ignore[no-untyped-def,override]
            raise AssertionError("not called")

    assert EnsemblePipeline([Fixed("a", 0.5)], Both())(question="Q").content == "from aggregate"


def test_what_your_aggregation_raises_or_returns_wrongly_is_named() -> None:
    class Raises(ResultAggregator):
        def aggregate(self, results):  # type: ignore[no-untyped-def,override]
            return 1 / 0

    class NoneBack:
        def combine(self, members):  # type: ignore[no-untyped-def]
            return None

    with pytest.raises(PipelineError, match=r"Raises\.aggregate\(\) raised ZeroDivisionError") as info:
        EnsemblePipeline([Fixed("a", 0.5)], Raises())(question="Q")
    assert info.value.code == "aggregate_failed"
    with pytest.raises(PipelineError, match=r"NoneBack\.combine\(\) returned NoneType"):
        EnsemblePipeline([Fixed("a", 0.5)], NoneBack())(question="Q")


def test_an_aggregate_that_is_not_callable_is_refused_when_built() -> None:
    class Nothing(ResultAggregator):
        aggregate = None  # type: ignore[assignment]

    with pytest.raises(ConfigurationError, match="aggregator must be"):
        EnsemblePipeline([Fixed("a", 0.5)], Nothing())


# -- helper 93: copies all the way down, and your own PipelineError named ---------------------------


def test_what_your_aggregation_changes_deep_inside_stays_in_its_copies() -> None:
    def lists(question: str) -> dict[str, Any]:
        return {"content": "a", "seen": [1]}

    class Deep(ResultAggregator):
        def aggregate(self, results):  # type: ignore[no-untyped-def,override]
            results[0]["result"]["seen"].append(99)
            return {"content": "x"}

    class Members(ResultAggregator):
        def combine(self, members):  # type: ignore[no-untyped-def,override]
            members[0]["content"] = "changed"
            members[0]["seen"].append(99)
            return {"content": "x"}

    for aggregator in (Deep(), Members()):
        r = EnsemblePipeline([lists], aggregator)(question="q")
        assert r.individual_results[0]["result"] == {"content": "a", "seen": [1]}
        assert r.individual_results[0]["fields"] == {"content": "a", "seen": [1]}


def test_a_pipeline_error_your_aggregate_raises_is_named_too() -> None:
    class Tutorialish(ResultAggregator):
        def aggregate(self, results):  # type: ignore[no-untyped-def,override]
            raise PipelineError("All processors failed")

    with pytest.raises(PipelineError, match=r"Tutorialish\.aggregate\(\) raised PipelineError") as info:
        EnsemblePipeline([Fixed("a", 0.5)], Tutorialish())(question="Q")
    assert isinstance(info.value.__cause__, PipelineError)
