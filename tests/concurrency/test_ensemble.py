"""EnsemblePipeline and ResultAggregator: strategies, failures, quorum, concurrency of members."""

from __future__ import annotations

import threading
import time
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ConfigurationError, EnsemblePipeline, PipelineError, ResultAggregator, StageError
from stageflow.engine.concurrency import abandoned_threads
from stageflow.testing import FakeLM, call


def member(answer: str, confidence: float | None = None) -> stageflow.FunctionStage:
    out: dict[str, Any] = {"answer": answer}
    if confidence is not None:
        out["confidence"] = confidence
    return stageflow.stage(lambda question: dict(out), writes=list(out), name=f"says_{answer}")


def failing(message: str = "down") -> stageflow.FunctionStage:
    def work(question: str) -> dict[str, Any]:
        raise RuntimeError(message)

    return stageflow.stage(work, writes=["answer"], name="failing")


def predictor(lm: FakeLM) -> dspy.Predict:
    p = dspy.Predict("question -> answer")
    p.lm = lm  # per-member model (a different latency per member)
    return p


# -- strategies --------------------------------------------------------------------------------------


async def test_weighted_voting_groups_normalised_answers(mode: str) -> None:
    members = [member("Paris", 0.4), member("paris.", 0.3), member("The Paris", 0.5), member("London", 0.9)]
    result = await call(EnsemblePipeline(members, ResultAggregator("weighted_voting")), mode, question="q")
    # 0.4 + 0.3 + 0.5 = 1.2 for Paris beats 0.9 for London, though London is the most confident member.
    assert result.votes == pytest.approx({"paris": 1.2, "london": 0.9})
    assert result.answer == "The Paris"  # the most confident member of the winning group
    assert result.confidence == pytest.approx(1.2 / 2.1)
    assert result.agreement == pytest.approx(1.2 / 2.1)
    assert result.strategy == "weighted_voting"


def test_weighted_voting_is_the_default_and_weights_matter() -> None:
    members = [member("Rome", 0.2), member("rome!", 0.2), member("Oslo", 0.9)]
    result = EnsemblePipeline(members)(question="q")
    assert result.answer == "Oslo"  # 0.9 > 0.4: confidence weights, not head counts
    assert result.votes == pytest.approx({"rome": 0.4, "oslo": 0.9})


async def test_best_confidence_picks_the_most_confident_member(mode: str) -> None:
    members = [member("Paris", 0.4), member("paris.", 0.3), member("London", 0.9), member("Rome", 0.1)]
    result = await call(EnsemblePipeline(members, ResultAggregator("best_confidence")), mode, question="q")
    assert result.answer == "London"
    assert result.confidence == 0.9


@pytest.mark.parametrize(("threshold", "reached"), [(0.5, True), (0.75, False)])
def test_consensus_reports_whether_the_threshold_was_reached(threshold: float, reached: bool) -> None:
    members = [member("Paris"), member("paris."), member("London"), member("Rome")]
    result = EnsemblePipeline(members, ResultAggregator("consensus", threshold=threshold))(question="q")
    assert result.answer in ("Paris", "paris.")
    assert result.agreement == pytest.approx(0.5)
    assert result.consensus is reached


async def test_consensus_async() -> None:
    members = [member("Paris"), member("Paris"), member("Paris"), member("Rome")]
    result = await EnsemblePipeline(members, ResultAggregator("consensus", threshold=0.7)).acall(question="q")
    assert result.answer == "Paris"
    assert result.consensus is True
    assert result.agreement == pytest.approx(0.75)


async def test_majority_uses_normalised_head_counts(mode: str) -> None:
    members = [member("London", 0.99), member("Paris", 0.1), member("paris.", 0.1), member("Rome", 0.99)]
    result = await call(EnsemblePipeline(members, ResultAggregator("majority")), mode, question="q")
    assert result.answer in ("Paris", "paris.")  # two votes, whatever the confidence
    assert result.strategy == "majority"


async def test_a_callable_strategy_gets_every_successful_member(mode: str) -> None:
    seen: list[list[dict[str, Any]]] = []

    def join(members: list[dict[str, Any]]) -> dict[str, Any]:
        seen.append(members)
        return {"answer": "+".join(m["answer"] for m in members)}

    members = [member("a"), failing(), member("b"), member("c")]
    result = await call(EnsemblePipeline(members, ResultAggregator(join)), mode, question="q")
    assert result.answer == "a+b+c"  # member order, the failure left out
    assert len(seen) == 1
    assert result.strategy == "join"


def test_aggregating_another_field() -> None:
    def m(label: str) -> stageflow.FunctionStage:
        return stageflow.stage(lambda question: {"label": label}, writes=["label"])

    result = EnsemblePipeline([m("spam"), m("SPAM!"), m("ham")], ResultAggregator(field="label"))(
        question="q"
    )
    assert result.label in ("spam", "SPAM!")
    assert result.votes == {"spam": 1.0, "ham": 0.5}  # members without confidence count 0.5 each


@pytest.mark.parametrize("bad", ["mode", "vote", ""])
def test_unknown_strategy_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(ConfigurationError) as ei:
        ResultAggregator(strategy=bad)
    assert ei.value.code == "bad_option"
    assert ei.value.field == "strategy"


# -- failures ------------------------------------------------------------------------------------------


async def test_individual_results_include_failures(mode: str) -> None:
    members = [member("Paris", 0.8), failing("model down"), member("Paris", 0.6)]
    result = await call(EnsemblePipeline(members), mode, question="q")
    assert result.answer == "Paris"
    individual = result.individual_results
    assert [r["member"] for r in individual] == ["processors[0]", "processors[1]", "processors[2]"]
    assert [r["status"] for r in individual] == ["ok", "error", "ok"]
    assert [r["ok"] for r in individual] == [True, False, True]
    assert individual[0]["fields"] == {"answer": "Paris", "confidence": 0.8}
    assert individual[1]["fields"] == {}
    assert isinstance(individual[1]["exception"], StageError)
    assert individual[1]["error"] == f"StageError: {individual[1]['exception']}"
    assert "model down" in str(individual[1]["error"])
    assert "error" not in individual[0]  # (the tutorial's record of a member that succeeded)


async def test_all_members_failing_is_a_pipeline_error(mode: str) -> None:
    members = [failing("a"), failing("b"), failing("c")]
    with pytest.raises(PipelineError) as ei:
        await call(EnsemblePipeline(members), mode, question="q")
    assert ei.value.code == "all_failed"
    assert set(ei.value.errors) == {"processors[0]", "processors[1]", "processors[2]"}
    assert all(isinstance(e, StageError) for e in ei.value.errors.values())


async def test_lm_member_failure_is_collected(mode: str) -> None:
    ok_lm = FakeLM({"answer": "Paris"})
    bad_lm = FakeLM({"answer": "x"}, fail_times=100)
    ens = EnsemblePipeline([predictor(ok_lm), predictor(bad_lm), predictor(ok_lm)])
    result = await call(ens, mode, question="q")
    assert result.answer == "Paris"
    assert [r["status"] for r in result.individual_results] == ["ok", "error", "ok"]
    assert ok_lm.calls == 2


class _Module(dspy.Module):
    """The tutorial's processor: a module returning a Prediction, or failing."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail

    def forward(self, content: str) -> dspy.Prediction:
        if self.fail:
            raise TimeoutError("the service did not answer")
        return dspy.Prediction(content="Paris", confidence=0.9)


async def test_a_failed_members_record_keeps_its_error_as_text_as_the_tutorials_does(mode: str) -> None:
    # (helper 114: the tutorial records 'error': str(e), and code written for it tests that text)
    ens = EnsemblePipeline([_Module(), _Module(fail=True)], ResultAggregator("weighted_voting"))
    result = await call(ens, mode, content="q")
    ok, failed = result.individual_results
    assert "error" not in ok  # (code written for the tutorial's records tests 'error' in record)
    assert "exception" not in ok
    assert ok["success"] is True
    assert failed["success"] is False
    assert isinstance(failed["error"], str)
    assert "did not answer" in failed["error"]
    assert failed["error"].startswith("StageError: ")
    assert isinstance(failed["exception"], StageError)
    assert isinstance(failed["exception"].__cause__, TimeoutError)


# -- concurrency and quorum ------------------------------------------------------------------------------


async def test_members_run_concurrently(mode: str) -> None:
    lm = FakeLM({"answer": "Paris"}, rendezvous=5)  # passes only if all 5 calls overlap
    ens = EnsemblePipeline([dspy.Predict("question -> answer") for _ in range(5)])
    with dspy.context(lm=lm):
        result = await call(ens, mode, question="q")
    assert result.answer == "Paris"
    assert lm.calls == 5
    assert lm.peak_active == 5


def _quorum_members() -> tuple[list[dspy.Predict], FakeLM, FakeLM]:
    fast = FakeLM({"answer": "Paris"}, latency=0.01)
    slow = FakeLM({"answer": "Lyon"}, latency=1.0)
    members = [predictor(fast), predictor(fast), predictor(slow), predictor(fast), predictor(slow)]
    return members, fast, slow


async def test_async_quorum_stops_early_and_cancels_the_slow_members() -> None:
    members, fast, slow = _quorum_members()
    result = await EnsemblePipeline(members, quorum=3).acall(question="q")
    assert result.answer == "Paris"
    statuses = [r["status"] for r in result.individual_results]
    assert statuses == ["ok", "ok", "cancelled", "ok", "cancelled"]
    assert fast.calls == 3
    assert slow.calls == 0  # never answered: cancelled while waiting
    assert slow.active == 0  # and no call is left running
    assert result.votes == {"paris": 1.5}  # three members without confidence, 0.5 each


def test_sync_quorum_stops_early_and_abandons_the_slow_members() -> None:
    members, fast, slow = _quorum_members()
    before = abandoned_threads()
    result = EnsemblePipeline(members, quorum=3)(question="q")
    assert slow.calls == 0  # returned while both slow members were still waiting for their model
    assert result.answer == "Paris"
    assert [r["status"] for r in result.individual_results] == ["ok", "ok", "cancelled", "ok", "cancelled"]
    assert fast.calls == 3
    assert abandoned_threads() == before + 2  # threads cannot be cancelled: reported as abandoned
    assert result.votes == {"paris": 1.5}  # three members without confidence, 0.5 each


def test_sync_quorum_abandons_a_slow_member_whichever_thread_runs_it() -> None:
    caller = threading.current_thread()
    release = threading.Event()
    slow_done = threading.Event()

    def work(question: str) -> dict[str, str]:
        if threading.current_thread() is caller:
            release.wait(1.0)  # slow (and dissenting) only when run by the calling thread
            slow_done.set()
            return {"answer": "Lyon"}
        time.sleep(0.05)
        return {"answer": "Paris"}

    members = [stageflow.stage(work, writes=["answer"]) for _ in range(5)]
    try:
        result = EnsemblePipeline(members, quorum=3)(question="q")
        assert not slow_done.is_set(), "the quorum was reached but the call waited for a slow member"
        assert result.answer == "Paris"
        assert "ok" not in [
            r["status"] for r in result.individual_results if r["fields"].get("answer") == "Lyon"
        ]
    finally:
        release.set()


@pytest.mark.parametrize(
    "mode",
    ["sync", "async"],
)
async def test_members_never_started_after_quorum_are_skipped(mode: str) -> None:
    ran: list[int] = []

    def m(i: int) -> stageflow.FunctionStage:
        def work(question: str) -> dict[str, str]:
            ran.append(i)
            return {"answer": "Paris"}

        return stageflow.stage(work, writes=["answer"], name=f"m{i}")

    ens = EnsemblePipeline([m(i) for i in range(4)], quorum=2, max_concurrency=1)
    result = await call(ens, mode, question="q")
    assert result.answer == "Paris"
    assert ran == [0, 1]
    assert [r["status"] for r in result.individual_results] == ["ok", "ok", "skipped", "skipped"]


def test_quorum_is_validated() -> None:
    with pytest.raises(ConfigurationError) as ei:
        EnsemblePipeline([member("a"), member("b")], quorum=3)
    assert ei.value.field == "quorum"
    with pytest.raises(ConfigurationError):
        EnsemblePipeline([member("a")], quorum=0)


def test_members_are_the_same_objects_on_every_call() -> None:
    lm = FakeLM({"answer": "a"})
    preds = [dspy.Predict("question -> answer"), dspy.Predict("question -> answer")]
    ens = EnsemblePipeline(preds)
    with dspy.context(lm=lm, trace=[]):
        ens(question="1")
        ens(question="2")
        traced = [p for p, _, _ in dspy.settings.trace]
    assert len(traced) == 4
    assert {id(p) for p in traced} == {id(p) for p in preds}
    assert [n for n, _ in ens.named_predictors()] == ["processors[0]", "processors[1]"]
