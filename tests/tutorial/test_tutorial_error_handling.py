"""Tutorial "Design Principles" §2 "Graceful Error Handling": ``ErrorHandlingPipeline``, ``StageError``,
``PipelineError``.

The tutorial's pipeline runs its stages in order; a stage that raises, or returns a result with a
truthy ``error``, is a failure: it is logged in ``error_log`` (``stage_index``, ``stage_name``,
``error``, ``input_state``), then ``recovery_strategies[i](error, state)`` may return a new state
(a falsy return means "not recovered"), non-critical errors (timeouts, low confidence) are skipped,
and anything else raises ``PipelineError(f"Failed at stage {i}: ...") from e``. The result has
``result`` and ``error_log``. stageflow decides "non-critical" by exception type (``TimeoutError``,
``LowConfidenceError``), never by the message text, and keeps no log from one call in the next.
"""

from __future__ import annotations

import dspy
import pytest

from stageflow import ErrorHandlingPipeline, LowConfidenceError, PipelineError, StageError, StandardStage
from stageflow.testing import FakeLM, call


# User code: stages that fail in the ways the tutorial handles.
class Retrieve(dspy.Module):
    def forward(self, question):
        return dspy.Prediction(passages=[f"passage on {question}"])


class FlakySearch(dspy.Module):
    def __init__(self, error):
        super().__init__()
        self.error = error

    def forward(self, passages):
        raise self.error


class ReportsError(dspy.Module):
    """A stage that catches its own failure and reports it in an `error` field."""

    def forward(self, passages):
        return dspy.Prediction(passages=[], error="index unavailable")


class Answer(dspy.Module):
    def __init__(self):
        super().__init__()
        self.answer = dspy.Predict("question, context -> answer")

    def forward(self, question, passages):
        return self.answer(question=question, context=" | ".join(passages))


class Uncertain(dspy.Module):
    def forward(self, passages):
        raise LowConfidenceError("the retriever is unsure about every passage")


def answer_lm() -> FakeLM:
    return FakeLM({"answer": lambda i: f"answer from {i['context']}"})


def use_cached_passages(error, state):
    return {**state, "passages": ["cached passage"]}


async def test_a_recovery_strategy_replaces_the_failed_stage(mode: str) -> None:
    pipeline = ErrorHandlingPipeline(
        [Retrieve(), FlakySearch(RuntimeError("search backend down")), Answer()],
        recovery_strategies={1: use_cached_passages},
    )
    with dspy.context(lm=answer_lm()):
        result = await call(pipeline, mode, question="Q")
    assert result.answer == "answer from cached passage"
    assert result.result["answer"] == result.answer  # the tutorial's `result=current_state`
    [entry] = result.error_log
    assert entry["stage_index"] == 1
    assert entry["stage_name"] == pipeline.stage_names[1]
    assert entry["error"] == "search backend down"
    assert entry["input_state"] == {"question": "Q", "passages": ["passage on Q"]}
    assert pipeline.error_log == result.error_log
    assert "error_log" not in result


async def test_the_recovery_strategy_gets_the_error_and_the_state(mode: str) -> None:
    seen = []

    def recover(error, state):
        seen.append((error, dict(state)))
        return {"passages": ["fallback"]}

    failure = RuntimeError("search backend down")
    pipeline = ErrorHandlingPipeline([Retrieve(), FlakySearch(failure), Answer()], {1: recover})
    with dspy.context(lm=answer_lm()):
        await call(pipeline, mode, question="Q")
    assert seen == [(failure, {"question": "Q", "passages": ["passage on Q"]})]


async def test_an_unrecovered_failure_raises_pipeline_error_from_the_original(mode: str) -> None:
    failure = RuntimeError("search backend down")
    pipeline = ErrorHandlingPipeline([Retrieve(), FlakySearch(failure), Answer()])
    lm = answer_lm()
    with dspy.context(lm=lm), pytest.raises(PipelineError) as info:
        await call(pipeline, mode, question="Q")
    assert info.value.__cause__ is failure
    assert "stage 1" in str(info.value)
    assert "search backend down" in str(info.value)
    assert lm.calls == 0  # the stage after the failure never ran
    assert [e["stage_index"] for e in pipeline.error_log] == [1]


async def test_a_truthy_error_field_is_a_failure(mode: str) -> None:
    pipeline = ErrorHandlingPipeline(
        [Retrieve(), ReportsError(), Answer()], recovery_strategies={1: use_cached_passages}
    )
    with dspy.context(lm=answer_lm()):
        result = await call(pipeline, mode, question="Q")
    assert result.answer == "answer from cached passage"
    [entry] = result.error_log
    assert entry["stage_index"] == 1
    assert "index unavailable" in entry["error"]

    unrecovered = ErrorHandlingPipeline([Retrieve(), ReportsError(), Answer()])
    with dspy.context(lm=answer_lm()), pytest.raises(PipelineError) as info:
        await call(unrecovered, mode, question="Q")
    assert isinstance(info.value.__cause__, StageError)
    assert "index unavailable" in str(info.value)


@pytest.mark.parametrize(
    "error",
    [TimeoutError("timeout"), LowConfidenceError("low_confidence")],
    ids=["timeout", "low_confidence"],
)
async def test_non_critical_errors_skip_the_stage(mode: str, error: Exception) -> None:
    pipeline = ErrorHandlingPipeline([Retrieve(), FlakySearch(error), Answer()])
    with dspy.context(lm=answer_lm()):
        result = await call(pipeline, mode, question="Q")
    assert result.answer == "answer from passage on Q"
    assert [e["stage_index"] for e in result.error_log] == [1]


async def test_non_critical_is_decided_by_type_not_by_the_message(mode: str) -> None:
    # Deliberately unlike the tutorial's `'timeout' in str(error).lower()`: a ValueError whose message
    # mentions a timeout is not a timeout.
    pipeline = ErrorHandlingPipeline([Retrieve(), FlakySearch(ValueError("bad timeout setting")), Answer()])
    with dspy.context(lm=answer_lm()), pytest.raises(PipelineError):
        await call(pipeline, mode, question="Q")
    low = ErrorHandlingPipeline([Retrieve(), Uncertain(), Answer()])
    with dspy.context(lm=answer_lm()):
        assert (await call(low, mode, question="Q")).answer == "answer from passage on Q"


async def test_a_stage_raising_the_tutorials_stage_error_is_handled(mode: str) -> None:
    # The tutorial raises StageError(f"Stage {i}: {result.error}") itself; a stage may do the same.
    pipeline = ErrorHandlingPipeline(
        [Retrieve(), FlakySearch(StageError("Stage 1: index unavailable")), Answer()],
        recovery_strategies={1: use_cached_passages},
    )
    with dspy.context(lm=answer_lm()):
        result = await call(pipeline, mode, question="Q")
    assert result.error_log[0]["error"] == "Stage 1: index unavailable"
    assert issubclass(StageError, Exception)
    assert issubclass(PipelineError, Exception)
    assert str(PipelineError("All processors failed")) == "All processors failed"


async def test_the_error_log_does_not_leak_into_the_next_call(mode: str) -> None:
    pipeline = ErrorHandlingPipeline([Retrieve(), FlakySearch(TimeoutError("timeout")), Answer()])
    with dspy.context(lm=answer_lm()):
        first = await call(pipeline, mode, question="Q1")
        second = await call(pipeline, mode, question="Q2")
    assert len(first.error_log) == len(second.error_log) == 1
    assert second.error_log[0]["input_state"]["question"] == "Q2"
    assert len(pipeline.error_log) == 1


@pytest.mark.parametrize("gave_up", [{}, False], ids=["empty-dict", "False"])
async def test_a_falsy_recovery_result_means_not_recovered(mode: str, gave_up: object) -> None:
    pipeline = ErrorHandlingPipeline(
        [Retrieve(), FlakySearch(RuntimeError("search backend down")), Answer()],
        recovery_strategies={1: lambda error, state: gave_up},
    )
    with dspy.context(lm=answer_lm()), pytest.raises(PipelineError):
        await call(pipeline, mode, question="Q")


async def test_the_logged_stage_name_is_the_stages_name_attribute(mode: str) -> None:
    search = FlakySearch(RuntimeError("search backend down"))
    search.name = "web_search"
    pipeline = ErrorHandlingPipeline([Retrieve(), search, Answer()], {1: use_cached_passages})
    with dspy.context(lm=answer_lm()):
        result = await call(pipeline, mode, question="Q")
    assert result.error_log[0]["stage_name"] == "web_search"


async def test_a_standard_stage_that_caught_an_exception_is_recovered(mode: str) -> None:
    # The tutorial's two halves together: a StandardStage turns an exception into
    # StageOutput(error=...), and the ErrorHandlingPipeline treats that truthy `error` as a failure.
    class Clean(StandardStage):
        def process(self, input_data):
            return {"content": input_data.content.strip(), "confidence": 1.0}

    class Enrich(StandardStage):
        def process(self, input_data):
            raise ConnectionError("enrichment service unreachable")

    class Shout(StandardStage):
        def process(self, input_data):
            return {"content": input_data.content.upper(), "confidence": 0.8}

    pipeline = ErrorHandlingPipeline(
        [Clean(), Enrich(), Shout()],
        recovery_strategies={1: lambda error, state: {**state, "content": state["content"] + " (raw)"}},
    )
    result = await call(pipeline, mode, content="  rivers  ")
    assert (result.content, result.confidence) == ("RIVERS (RAW)", 0.8)
    [entry] = result.error_log
    assert entry["stage_index"] == 1
    assert "enrichment service unreachable" in entry["error"]

    unrecovered = ErrorHandlingPipeline([Clean(), Enrich(), Shout()])
    with pytest.raises(PipelineError) as info:
        await call(unrecovered, mode, content="rivers")
    assert "enrichment service unreachable" in str(info.value)


# The tutorial's pipeline decides what to skip in `_should_continue_on_error(error)`; a subclass that
# overrides it (here with the tutorial's own message test) is honoured.
class MessageLenient(ErrorHandlingPipeline):
    def _should_continue_on_error(self, error):
        non_critical_errors = ["timeout", "low_confidence"]
        return any(err in str(error).lower() for err in non_critical_errors)


class TimeoutMessage(dspy.Module):
    def forward(self, content):
        raise RuntimeError("request timeout after 30s")


class Append(dspy.Module):
    def forward(self, content):
        return dspy.Prediction(content=content + "+ok")


async def test_an_overridden_should_continue_on_error_decides_what_is_skipped(mode: str) -> None:
    lenient = MessageLenient([Append(), TimeoutMessage(), Append()])
    assert (await call(lenient, mode, content="x")).content == "x+ok+ok"
    strict = ErrorHandlingPipeline([Append(), TimeoutMessage(), Append()])  # by type: a RuntimeError fails
    with pytest.raises(PipelineError):
        await call(strict, mode, content="x")
