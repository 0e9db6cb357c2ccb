"""LM budgets around runs, stages and blocks: what counts, what is free, and what the error says."""

from __future__ import annotations

import asyncio

import dspy
import pytest
from budget_kit import FakeClock

import stageflow
from stageflow.budgets import LMBudget
from stageflow.testing import FakeLM, call


def two_steps() -> stageflow.SequentialPipeline:
    return stageflow.SequentialPipeline(
        [dspy.Predict("question -> answer"), dspy.Predict("answer -> summary")]
    )


async def test_a_run_budget_refuses_the_call_past_it_and_names_stage_and_budget(mode: str) -> None:
    lm = FakeLM()
    pipe = two_steps().set_budget(max_calls=1)
    with dspy.context(lm=lm), pytest.raises(stageflow.BudgetExceeded) as info:
        await call(pipe, mode, question="q")
    err = info.value
    assert lm.calls == 1  # the second stage never reached the model
    assert err.stage_path == "stages[1]"
    assert (err.limit_name, err.spent, err.limit, err.needed) == ("max_calls", 1, 1, 1)
    assert str(err) == (
        "Stage 'stages[1]' was refused an LM call: the run budget of SequentialPipeline has spent its "
        "max_calls (1 of max_calls=1 LM calls used; this call needs 1 more).\n"
        "Fix: raise max_calls, declare a degradation (LMBudget(..., degrade=stageflow.Degrade(lm=...))), "
        "or let an optional stage be skipped: Stage(x, skip_on=[stageflow.BudgetExceeded])"
    )
    assert err.ledger.calls == 1
    assert isinstance(err, stageflow.StageflowError)
    assert err.run.stage_outputs["stages[0]"].answer == "ok"  # what ran before the refusal is kept


async def test_each_run_gets_a_fresh_account(mode: str) -> None:
    lm = FakeLM()
    pipe = two_steps().set_budget(max_calls=2)
    with dspy.context(lm=lm):
        for _ in range(3):
            assert (await call(pipe, mode, question="q")).summary == "ok"
    assert lm.calls == 6


async def test_a_nested_pipeline_names_its_full_path(mode: str) -> None:
    inner = two_steps()
    outer = stageflow.SequentialPipeline(
        [stageflow.stage(lambda question: {"q": question}, writes=["q"]), inner]
    )
    outer.stages[1] = stageflow.Stage(inner, inputs={"question": "q"})
    with (
        dspy.context(lm=FakeLM()),
        stageflow.budget(max_calls=1),
        pytest.raises(stageflow.BudgetExceeded) as info,
    ):
        await call(outer, mode, question="q")
    assert info.value.stage_path == "stages[1].stages[1]"
    assert str(info.value).startswith(
        "Stage 'stages[1].stages[1]' was refused an LM call: stageflow.budget()"
    )


async def test_nested_budgets_hold_inner_and_outer(mode: str) -> None:
    lm = FakeLM()
    pipe = two_steps().set_budget(max_calls=2)  # each run may make 2 calls ...
    with dspy.context(lm=lm), stageflow.budget(max_calls=5) as outer:  # ... and all of them 5
        await call(pipe, mode, question="a")
        await call(pipe, mode, question="b")
        with pytest.raises(stageflow.BudgetExceeded) as info:
            await call(pipe, mode, question="c")
    assert info.value.scope == "stageflow.budget()"
    assert info.value.stage_path == "stages[1]"
    assert outer.calls == 5 == lm.calls
    assert outer.reserved_calls == 0


async def test_a_stage_budget_holds_for_each_call_of_the_stage(mode: str) -> None:
    lm = FakeLM()
    limited = stageflow.Stage(dspy.Predict("answer -> summary"), budget=LMBudget(max_calls=0))
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer"), limited])
    with dspy.context(lm=lm), pytest.raises(stageflow.BudgetExceeded) as info:
        await call(pipe, mode, question="q")
    assert info.value.scope == "the budget of stage 'stages[1]'"
    assert lm.calls == 1


async def test_retried_calls_count(mode: str) -> None:
    lm = FakeLM(fail_times=2)
    retry = stageflow.RetryPolicy(max_attempts=5, initial_delay=0, retry_on=lambda e: True)
    pipe = stageflow.SequentialPipeline([stageflow.Stage(dspy.Predict("question -> answer"), retry=retry)])
    with dspy.context(lm=lm), stageflow.budget(max_calls=3) as spent:
        result = await call(pipe, mode, question="q")
    assert result.answer == "ok"
    assert spent.calls == 3 == lm.calls  # two failed attempts and the one that worked
    assert spent.tokens > 0
    assert [e.kind for e in result.run.events] == ["retry", "retry"]


async def test_a_budget_stops_a_retry_loop(mode: str) -> None:
    lm = FakeLM(fail_times=100)
    retry = stageflow.RetryPolicy(max_attempts=50, initial_delay=0, retry_on=lambda e: True)
    pipe = stageflow.SequentialPipeline([stageflow.Stage(dspy.Predict("question -> answer"), retry=retry)])
    with dspy.context(lm=lm), stageflow.budget(max_calls=4), pytest.raises(stageflow.BudgetExceeded):
        await call(pipe, mode, question="q")
    assert lm.calls == 4


async def test_stage_cache_hits_cost_nothing(mode: str) -> None:
    lm = FakeLM()
    pipe = stageflow.SequentialPipeline([stageflow.Stage(dspy.Predict("question -> answer"), cache=True)])
    with dspy.context(lm=lm), stageflow.budget(max_calls=1) as spent:
        for _ in range(5):
            assert (await call(pipe, mode, question="same")).answer == "ok"
    assert spent.calls == 1 == lm.calls


async def test_lm_cache_hits_cost_nothing_even_when_the_budget_is_spent(mode: str) -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=True)
    lm = FakeLM(cache=True, model="stageflow-fake/cached-" + mode)
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=lm), stageflow.budget(max_calls=1) as spent:
        first = await call(pipe, mode, question="same")
        again = [await call(pipe, mode, question="same") for _ in range(3)]
        with pytest.raises(stageflow.BudgetExceeded):
            await call(pipe, mode, question="different")
    assert [first.answer, *(r.answer for r in again)] == ["ok"] * 4
    assert spent.calls == 1 == lm.calls
    assert again[-1].run.usage.total.lm_cache_hits == 1
    assert spent.reserved_calls == spent.reserved_tokens == 0


async def test_tokens_are_settled_to_what_the_model_reports(mode: str) -> None:
    lm = FakeLM(usage=(120, 30), max_tokens=50)
    with dspy.context(lm=lm), stageflow.budget(max_tokens=10_000) as spent:
        result = await call(two_steps(), mode, question="q")
    assert (spent.input_tokens, spent.output_tokens) == (240, 60)
    assert result.run.usage.total.total_tokens == spent.tokens
    assert spent.reserved_tokens == 0


async def test_a_token_budget_refuses_a_call_that_could_overshoot(mode: str) -> None:
    lm = FakeLM(usage=(10, 5), max_tokens=2_000)
    with (
        dspy.context(lm=lm),
        stageflow.budget(max_tokens=1_000),
        pytest.raises(stageflow.BudgetExceeded) as info,
    ):
        await call(two_steps(), mode, question="q")
    assert lm.calls == 0  # max_tokens 2000 alone is more than the budget: nothing was sent
    assert info.value.limit_name == "max_tokens"
    assert info.value.needed > 2_000
    assert "this call would hold" in str(info.value)
    assert "give the LM a smaller max_tokens" in str(info.value)


async def test_default_max_tokens_is_reserved_when_the_lm_sets_none(mode: str) -> None:
    lm = FakeLM(usage=(10, 5))
    assert lm.kwargs.get("max_tokens") is None
    small = LMBudget(max_tokens=3_000, default_max_tokens=100)
    with dspy.context(lm=lm), stageflow.budget(small) as spent:
        await call(two_steps(), mode, question="q")
    assert spent.tokens == 30
    with dspy.context(lm=lm), stageflow.budget(max_tokens=3_000), pytest.raises(stageflow.BudgetExceeded):
        await call(two_steps(), mode, question="q")  # the default reservation (4096) does not fit


async def test_cost_budget_counts_reported_cost(mode: str) -> None:
    lm = FakeLM(cost=0.25, usage=(10, 10), max_tokens=10)
    with dspy.context(lm=lm), stageflow.budget(max_cost=0.6) as spent:
        await call(two_steps(), mode, question="q")  # 0.50 spent
        with pytest.raises(stageflow.BudgetExceeded) as info:
            await call(two_steps(), mode, question="q")  # the next call may cost 0.25 + margin: refused
    assert spent.cost == pytest.approx(0.5)
    assert lm.calls == 2
    assert info.value.limit_name == "max_cost"
    assert "this call may cost up to" in str(info.value)


async def test_max_seconds_refuses_calls_after_the_deadline(mode: str) -> None:
    clock = FakeClock()
    lm = FakeLM()
    pipe = stageflow.SequentialPipeline(
        [
            dspy.Predict("question -> answer"),
            stageflow.stage(lambda answer: clock.advance(31) or {"waited": True}, writes=["waited"]),
            dspy.Predict("answer -> summary"),
        ]
    )
    with (
        dspy.context(lm=lm),
        stageflow.budget(max_seconds=30, clock=clock),
        pytest.raises(stageflow.BudgetExceeded) as info,
    ):
        await call(pipe, mode, question="q")
    assert info.value.limit_name == "max_seconds"
    assert info.value.stage_path == "stages[2]"
    assert "31.0 s of max_seconds=30 have passed" in str(info.value)
    assert lm.calls == 1


async def test_an_optional_stage_is_skipped_when_the_budget_runs_out(mode: str) -> None:
    lm = FakeLM()
    optional = stageflow.Stage(dspy.Predict("answer -> critique"), skip_on=[stageflow.BudgetExceeded])
    pipe = stageflow.SequentialPipeline([dspy.Predict("question -> answer"), optional])
    with dspy.context(lm=lm), stageflow.budget(max_calls=1):
        result = await call(pipe, mode, question="q")
    assert result.answer == "ok"
    assert "critique" not in result
    skipped = [e for e in result.run.events if e.kind == "skipped"]
    assert [e.stage for e in skipped] == ["stages[1]"]
    assert "BudgetExceeded" in skipped[0].error


def test_a_bare_predict_outside_any_pipeline_is_held_too() -> None:
    lm = FakeLM()
    qa = dspy.Predict("question -> answer")
    with dspy.context(lm=lm), stageflow.budget(max_calls=2) as spent:
        qa(question="a")
        asyncio.run(qa.acall(question="b"))
        with pytest.raises(stageflow.BudgetExceeded) as info:
            qa(question="c")
    assert info.value.stage_path is None
    assert str(info.value).startswith("An LM call was refused: stageflow.budget() has spent its max_calls")
    assert spent.calls == 2 == lm.calls
    assert spent.refused == 1


def test_an_unlimited_budget_only_accounts() -> None:
    lm = FakeLM(usage=(7, 3), cost=0.01)
    with dspy.context(lm=lm), stageflow.budget() as spent:
        two_steps()(question="q")
    assert (spent.calls, spent.tokens, spent.cost) == (2, 20, pytest.approx(0.02))
    assert spent.remaining() == {"calls": None, "tokens": None, "cost": None, "seconds": None}
    assert spent.to_dict()["calls"] == 2


def test_a_budget_closed_is_no_longer_in_force() -> None:
    lm = FakeLM()
    with dspy.context(lm=lm):
        with stageflow.budget(max_calls=0):
            pass
        assert two_steps()(question="q").summary == "ok"
    assert lm.calls == 2


def test_usage_tables_see_the_cost_a_custom_engine_reports() -> None:
    lm = FakeLM(cost=0.125)
    with dspy.context(lm=lm):
        result = two_steps()(question="q")
    assert result.run.usage.total.cost == pytest.approx(0.25)
