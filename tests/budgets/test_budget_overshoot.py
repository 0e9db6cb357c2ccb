"""How far a token or cost budget can be overshot when a call has no known upper bound, or reports
more than it held (the finding r_budget_1): the bound the README states, under 32 threads and
64 asyncio tasks (counts, not times)."""

from __future__ import annotations

from typing import Any

import dspy
import pytest
from budget_kit import CALLS_EACH, TASKS, THREADS, FakeClock, storm, tally

import stageflow
from stageflow.budgets import sizing
from stageflow.budgets.calibrate import Knowledge, Need
from stageflow.budgets.spec import LMBudget
from stageflow.testing import MODES, FakeLM, call

TOTAL = (THREADS + TASKS) * CALLS_EACH


def overruns(spent: Any) -> list[Any]:
    return [e for e in spent.events if e.kind == "budget_overrun"]


def test_a_cost_budget_with_no_known_price_is_not_overshot_by_a_storm() -> None:
    # r_budget_1 (a): all 64 calls ran ($0.64 against $0.05): nothing was held for cost before the
    # first call settled. Now the first call goes alone and calibrates the others.
    lm = FakeLM(latency=0.002, usage=(100, 20), max_tokens=50, cost=0.01)
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    counts, on_result = tally()
    with dspy.context(lm=lm), stageflow.budget(max_cost=0.05, clock=FakeClock()) as spent:
        storm(pipe, on_result)
    assert spent.cost == pytest.approx(0.05)  # every call costs the same: exactly the limit
    assert lm.calls == counts["ok"] == 5
    assert counts["refused"] == TOTAL - 5
    assert (spent.reserved_calls, spent.reserved_cost) == (0, 0)
    assert overruns(spent) == []


def test_a_cost_budget_is_overshot_by_at_most_one_call_while_nothing_is_known() -> None:
    # a budget smaller than one call: the first call (the probe) is the only one that may overshoot
    lm = FakeLM(latency=0.002, usage=(100, 20), max_tokens=50, cost=0.01)
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    counts, on_result = tally()
    with dspy.context(lm=lm), stageflow.budget(max_cost=0.004) as spent:
        storm(pipe, on_result)
    assert lm.calls == counts["ok"] == 1
    assert spent.cost == pytest.approx(0.01)  # limit + at most one call
    assert lm.peak_active == 1


def test_a_model_that_ignores_max_tokens_overshoots_by_at_most_its_first_call() -> None:
    # r_budget_1 (b): 29 calls, 147,900 tokens against 20,000: each held prompt + max_tokens=50 and
    # reported 5,100. Now the first call goes alone (this engine does not enforce max_tokens); its
    # overrun scales every later hold, so the rest stay inside the budget.
    lm = FakeLM(latency=0.002, usage=(100, 5_000), max_tokens=50)
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    counts, on_result = tally()
    limit = 20_000
    with dspy.context(lm=lm), stageflow.budget(max_tokens=limit, clock=FakeClock()) as spent:
        storm(pipe, on_result)
    assert spent.tokens == 5_100 * lm.calls
    assert spent.tokens <= limit  # the probe's overrun fitted; the documented bound is limit + 1 call
    assert lm.calls == counts["ok"] == limit // 5_100
    assert counts["refused"] == TOTAL - lm.calls
    [event] = overruns(spent)  # only the probe held less than it used
    assert event.detail["probe"] is True
    assert event.detail["reported"] == 5_100
    assert event.detail["reserved"] < 5_100
    assert event.detail["budget"] == "stageflow.budget()"


def test_a_model_that_overruns_after_calibration_overshoots_by_the_calls_then_in_flight() -> None:
    # the first 10 calls report what they may; then the model starts ignoring max_tokens. Calls in
    # flight at that moment can overshoot; nothing starts once the budget is crossed.
    state = {"n": 0}

    def usage(inputs: dict[str, Any]) -> tuple[int, int]:
        state["n"] += 1
        return (100, 20) if state["n"] <= 10 else (100, 5_000)

    lm = FakeLM(latency=0.002, usage=usage, max_tokens=50)
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    counts, on_result = tally()
    limit = 30_000
    with dspy.context(lm=lm), stageflow.budget(max_tokens=limit, clock=FakeClock()) as spent:
        storm(pipe, on_result)
    events = overruns(spent)
    assert events
    assert all(not e.detail["probe"] for e in events)
    [crossing] = [e for e in spent.events if e.kind == "budget_exhausted"]
    assert crossing.detail["limit"] == "max_tokens"
    # the documented bound: the call that crossed it and the calls then in flight, each ≤ 5,100
    bound = (crossing.detail["in_flight"] + 1) * 5_100
    assert limit < spent.tokens <= limit + bound
    assert counts["ok"] == lm.calls
    assert counts["refused"] == TOTAL - lm.calls
    assert (spent.reserved_calls, spent.reserved_tokens) == (0, 0)


@pytest.mark.parametrize("mode", MODES)
async def test_an_overrun_is_an_event_of_the_stage_and_ends_the_budget(mode: str) -> None:
    lm = FakeLM(usage=(10, 3_000), max_tokens=10)
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")]).set_budget(max_tokens=2_000)
    with dspy.context(lm=lm):
        result = await call(pipe, mode, question="q")  # allowed: nothing was known; overshoots once
    [event] = [e for e in result.run.events if e.kind == "budget_overrun"]
    assert event.stage == "stages[0]"
    assert event.detail["exhausted"] is True
    assert event.detail["reported"] == 3_010
    two = stageflow.SequentialPipeline([dspy.Predict("question -> answer"), dspy.Predict("answer -> more")])
    with dspy.context(lm=lm), pytest.raises(stageflow.BudgetExceeded) as info:
        await call(two.set_budget(max_tokens=2_000), mode, question="q")
    assert info.value.stage_path == "stages[1]"  # the second call is refused: the budget is crossed
    assert info.value.limit_name == "max_tokens"
    assert "run budget" in str(info.value)


@pytest.mark.parametrize("mode", MODES)
async def test_a_model_that_enforces_max_tokens_needs_no_careful_first_call(mode: str) -> None:
    lm = FakeLM(latency=0.01, usage=(20, 500), max_tokens=5, enforce_max_tokens=True, rendezvous=4)
    each = stageflow.ForEach(dspy.Predict("question -> answer"), over="questions", collect="answers")
    with dspy.context(lm=lm), stageflow.budget(max_tokens=100_000) as spent:
        await call(each, mode, questions=["a", "b", "c", "d"])
    assert lm.peak_active == 4  # all four at once from the start
    assert spent.tokens == 4 * 25  # the fake stopped at max_tokens, as a real provider does
    assert overruns(spent) == []


def test_a_call_dearer_than_a_known_price_bound_is_held_at_that_bound() -> None:
    know = Knowledge()
    limits = LMBudget(max_cost=1.0, max_tokens=10_000)
    priced = Need(calls=1, tokens=300, model="m", prompt_tokens=200, bounded=True, cost_bound=0.002)
    hold = know.hold(priced, limits)
    assert (hold.tokens, hold.cost, hold.probe) == (300, 0.002, False)  # a bound: no careful first call
    unpriced = priced._replace(cost_bound=None)
    assert know.hold(unpriced, limits).probe is True  # the cost has no bound: careful


def test_dspy_engines_enforce_max_tokens_and_known_models_have_prices(monkeypatch: Any) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "true")  # the bundled table: no network
    lm = dspy.LM("openai/gpt-4o-mini", max_tokens=100)
    assert sizing.enforces_max_tokens(lm) is True
    rates = sizing.prices(lm)
    assert rates is not None
    from dspy.clients.model_metadata import model_info, rate

    info = model_info("openai-chat", "gpt-4o-mini")
    assert rates[0] >= (rate(info, "input_cost_per_token") or 0) > 0
    assert rates[1] >= (rate(info, "output_cost_per_token") or 0) > 0
    assert sizing.prices(dspy.LM("openai/no-such-model-xyz")) is None
    assert sizing.prices(FakeLM()) is None
    assert sizing.enforces_max_tokens(FakeLM()) is False


def test_the_embedded_engine_declares_that_it_stops_at_max_tokens() -> None:
    # llama.cpp is sent max_tokens on every call, so a budget may reserve it as a bound (no careful
    # first call on the embedded model).
    from stageflow.budgets.sizing import enforces_max_tokens
    from stageflow.lm.engine import AsyncLlamaCppEngine, LlamaCppEngine

    engine = LlamaCppEngine.__new__(LlamaCppEngine)  # no model file needed to ask
    assert LlamaCppEngine.enforces_max_tokens is AsyncLlamaCppEngine.enforces_max_tokens is True
    assert enforces_max_tokens(dspy.LM("local/x", engine=engine))
