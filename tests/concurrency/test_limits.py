"""Concurrency limits hold (measured as counts, never as times), and options are validated."""

from __future__ import annotations

import asyncio
import threading

import dspy
import pytest

import stageflow
from stageflow.engine import concurrency
from stageflow.testing import FakeLM


def _foreach(max_concurrency: int | None = None) -> stageflow.ForEach:
    return stageflow.ForEach(
        dspy.Predict("sub_question -> fact"),
        over="sub_questions",
        collect="facts",
        max_concurrency=max_concurrency,
    )


QUESTIONS = [f"q{i}" for i in range(32)]


@pytest.fixture(autouse=True)
def _no_global_cap() -> object:
    yield
    stageflow.configure(max_concurrency=None)


def test_cap_of_4_over_32_branches_peaks_at_exactly_4_sync() -> None:
    # each call waits until 4 are in flight: peak == 4 proves the cap is reached, never exceeded
    lm = FakeLM({"fact": lambda i: "f-" + i["sub_question"]}, rendezvous=4)
    with dspy.context(lm=lm), stageflow.limits(max_concurrency=4) as budget:
        result = _foreach()(sub_questions=QUESTIONS)
    assert result.facts == [f"f-q{i}" for i in range(32)]
    assert lm.peak_active == 4
    assert budget is not None
    assert budget.peak == 4


async def test_cap_of_4_over_32_branches_peaks_at_exactly_4_async() -> None:
    lm = FakeLM({"fact": "f"}, rendezvous=4)
    with dspy.context(lm=lm), stageflow.limits(max_concurrency=4):
        result = await _foreach().acall(sub_questions=QUESTIONS)
    assert len(result.facts) == 32
    assert lm.peak_active == 4


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_global_cap_holds_for_foreach_nested_in_an_ensemble(mode: str) -> None:
    lm = FakeLM({"fact": "f", "answer": "a"}, rendezvous=4)
    members = [
        stageflow.SequentialPipeline(
            [_foreach(), stageflow.stage(lambda facts: {"answer": "a"}, writes=["answer"])]
        )
        for _ in range(3)
    ]
    ensemble = stageflow.EnsemblePipeline(members)
    stageflow.configure(max_concurrency=4)
    with dspy.context(lm=lm):
        if mode == "sync":
            result = ensemble(sub_questions=QUESTIONS)
        else:
            result = asyncio.run(ensemble.acall(sub_questions=QUESTIONS))
    assert result.answer == "a"
    assert lm.calls == 96
    assert lm.peak_active == 4


def test_pattern_cap_nested_under_a_looser_outer_cap() -> None:
    lm = FakeLM({"fact": "f"}, rendezvous=3, rendezvous_timeout=0.3)  # 32 = 10 waves of 3 + 2
    with dspy.context(lm=lm), stageflow.limits(max_concurrency=8):
        _foreach(max_concurrency=3)(sub_questions=QUESTIONS)
    assert lm.peak_active == 3


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_without_a_cap_every_branch_runs_at_once(mode: str) -> None:
    # Every branch waits at a barrier for all 32: it only passes if all 32 run at the same time
    # (no silent default cap); the timeout is a safety net, not a measurement.
    barrier = threading.Barrier(32, timeout=20)

    def meet(sub_question: str) -> dict[str, str]:
        barrier.wait()
        return {"fact": sub_question}

    fe = stageflow.ForEach(stageflow.stage(meet, writes=["fact"]), over="sub_questions", collect="facts")
    result = fe(sub_questions=QUESTIONS) if mode == "sync" else asyncio.run(fe.acall(sub_questions=QUESTIONS))
    assert result.facts == QUESTIONS
    assert not barrier.broken


def test_small_cap_with_a_function_stage_calling_a_pipeline_does_not_deadlock() -> None:
    inner = stageflow.SequentialPipeline([dspy.Predict("x -> y")])

    @stageflow.stage(writes=["y"])
    def wrapper(x: str) -> dict[str, str]:
        return {"y": inner(x=x).y}

    lm = FakeLM({"y": "ok"})
    done: list[object] = []

    def run() -> None:
        with dspy.context(lm=lm), stageflow.limits(max_concurrency=1):
            done.append(stageflow.ForEach(wrapper, over="xs", item="x", collect="ys")(xs=["a", "b", "c"]))

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=10)
    assert not t.is_alive(), "deadlock: a leaf holding the only slot waited for a nested leaf"
    assert done
    assert done[0].ys == ["ok", "ok", "ok"]


def test_unknown_options_are_errors() -> None:
    with pytest.raises(stageflow.ConfigurationError, match="unknown option") as err:
        stageflow.configure(max_concurency=4)
    assert err.value.field == "max_concurency"
    with (
        pytest.raises(stageflow.ConfigurationError, match="unknown option"),
        stageflow.limits(max_concurrency=2, burst=3),
    ):
        pass


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_bad_caps_are_rejected(bad: object) -> None:
    with pytest.raises(stageflow.ConfigurationError):
        stageflow.configure(max_concurrency=bad)
    with pytest.raises(stageflow.ConfigurationError):
        stageflow.ForEach(dspy.Predict("a -> b"), over="as", max_concurrency=bad)  # type: ignore[arg-type]


def test_the_thread_pool_is_long_lived() -> None:
    lm = FakeLM({"fact": "f"})
    with dspy.context(lm=lm):
        _foreach()(sub_questions=["a", "b"])
        first = concurrency.shared_pool()
        _foreach()(sub_questions=["c", "d"])
    assert first is not None
    assert concurrency.shared_pool() is first


def test_get_config_reports_the_cap() -> None:
    stageflow.configure(max_concurrency=7)
    assert stageflow.get_config()["max_concurrency"] == 7
    stageflow.configure(max_concurrency=None)
    assert stageflow.get_config()["max_concurrency"] is None
