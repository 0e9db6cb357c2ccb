"""Usage per stage (``result.run.usage``) agrees with DSPy's own accounting, under threads and asyncio."""

from __future__ import annotations

from typing import Any

import dspy
import pytest
from usage_kit import WIDTH, CostlyLM, fan_out_lm, fan_out_program, quiet_legacy_lm

import stageflow
from stageflow.testing import FakeLM, call


def _tracker_totals(tracker: Any, model: str) -> tuple[int, int]:
    totals = tracker.get_total_tokens()[model]
    return totals["prompt_tokens"], totals["completion_tokens"]


async def test_totals_match_dspy_track_usage_with_32_way_foreach_and_ensemble(mode: str) -> None:
    lm = fan_out_lm()
    program = fan_out_program()
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        result = await call(program, mode, question="Where is the Louvre?")
    usage = result.run.usage
    total = usage.total
    assert lm.calls == 1 + WIDTH + 3
    assert total.lm_calls == lm.calls
    assert (total.input_tokens, total.output_tokens) == _tracker_totals(tracker, lm.model)
    assert total.input_tokens > 0
    assert total.output_tokens > 0
    # Every call is attributed to the stage that made it.
    assert usage["stages[0]"].lm_calls == 1
    foreach = usage.subtree("stages[1]")
    assert foreach.lm_calls == WIDTH
    assert [usage[f"stages[1].stage[{i}]"].lm_calls for i in range(WIDTH)] == [1] * WIDTH
    assert usage.subtree("stages[2]").lm_calls == 3
    assert usage.get("stages[3]") is None  # the function stage used no LM
    # The roll-up tree adds the items up under the ForEach.
    tree = usage.tree()
    assert tree["usage"]["lm_calls"] == lm.calls
    assert tree["children"]["stages[1]"]["usage"]["lm_calls"] == WIDTH
    assert len(tree["children"]["stages[1]"]["children"]) == WIDTH


async def test_tokens_match_sum_of_separate_runs(mode: str) -> None:
    """Concurrency loses nothing: the fan-out's tokens equal the same calls made one by one."""
    lm = fan_out_lm()
    with dspy.context(lm=lm):
        result = await call(fan_out_program(), mode, question="Where is the Louvre?")
        one_item = await call(
            stageflow.SequentialPipeline([dspy.Predict("sub_question -> fact")]),
            mode,
            sub_question="sub question 7",
        )
    item_tokens = one_item.run.usage.total
    assert result.run.usage["stages[1].stage[7]"].input_tokens == item_tokens.input_tokens
    assert result.run.usage["stages[1].stage[7]"].output_tokens == item_tokens.output_tokens


async def test_usage_inside_dspy_track_usage_context_flag(mode: str) -> None:
    """``dspy.context(track_usage=True)``: the result's own LM usage (DSPy's) agrees with stageflow's."""
    lm = fan_out_lm()
    with dspy.context(lm=lm, track_usage=True):
        result = await call(fan_out_program(), mode, question="q")
    dspy_usage = result.get_lm_usage()[lm.model]
    total = result.run.usage.total
    assert (total.input_tokens, total.output_tokens) == (
        dspy_usage["prompt_tokens"],
        dspy_usage["completion_tokens"],
    )


async def test_cost_reported_by_the_model_is_summed_per_stage(mode: str) -> None:
    lm = CostlyLM(price=0.25)
    program = stageflow.SequentialPipeline(
        [
            dspy.Predict("question -> answer"),
            stageflow.ForEach(dspy.Predict("item -> answer"), over="topics", item="item", collect="answers"),
        ]
    )
    with quiet_legacy_lm(), dspy.context(lm=lm), dspy.track_usage() as tracker:
        result = await call(program, mode, question="q", topics=["a", "b", "c", "d"])
    usage = result.run.usage
    assert lm.calls == 5
    assert usage["stages[0]"].cost == pytest.approx(0.25)
    assert usage.subtree("stages[1]").cost == pytest.approx(1.0)
    assert usage.total.cost == pytest.approx(1.25)
    assert (usage.total.input_tokens, usage.total.output_tokens) == _tracker_totals(tracker, lm.model)
    assert usage.total.to_dict()["cost"] == pytest.approx(1.25)


def test_lm_cache_hits_are_counted_and_not_billed() -> None:
    dspy.configure_cache(enable_memory_cache=True, enable_disk_cache=False)
    lm = fan_out_lm()
    lm.cache = True  # DSPy's answer cache (FakeLM turns it off by default)
    program = stageflow.SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        first = program(question="the same question")
        second = program(question="the same question")
    assert lm.calls == 1
    assert first.run.usage.total.lm_calls == 1
    hit = second.run.usage.total
    assert (hit.lm_calls, hit.lm_cache_hits, hit.input_tokens, hit.output_tokens) == (0, 1, 0, 0)
    # DSPy bills the cached answer nothing either.
    assert _tracker_totals(tracker, lm.model) == (
        first.run.usage.total.input_tokens,
        first.run.usage.total.output_tokens,
    )


async def test_retries_and_stage_cache_hits_are_counted(mode: str) -> None:
    lm = FakeLM({"answer": "42"}, fail_times=2)
    retried = stageflow.Stage(
        dspy.Predict("question -> answer"),
        retry=stageflow.RetryPolicy(max_attempts=3, sleep=lambda s: None, retry_on=lambda e: True),
    )
    cached = stageflow.CachedStage(dspy.Predict("answer -> check"))
    program = stageflow.SequentialPipeline([retried, cached])
    with dspy.context(lm=lm):
        first = await call(program, mode, question="q")
        lm.fail_times = lm.calls + 2  # the next two calls fail again
        second = await call(program, mode, question="q")
    assert first.run.usage["stages[0]"].retries == 2
    assert first.run.usage["stages[0]"].lm_calls == 1  # failed calls reached no model
    assert second.run.usage["stages[1]"].cache_hits == 1
    assert second.run.usage.get("stages[1]") is not None
    assert second.run.usage["stages[1]"].lm_calls == 0


class _ParallelFacts(dspy.Module):  # type: ignore[misc]
    """A custom module that fans out with ``dspy.Parallel`` (DSPy's own threads)."""

    def __init__(self) -> None:
        super().__init__()
        self.predict = dspy.Predict("sub_question -> fact")

    def forward(self, sub_questions: list[str]) -> dspy.Prediction:
        jobs = [(self.predict, {"sub_question": q}) for q in sub_questions]
        facts = dspy.Parallel(num_threads=4, disable_progress_bar=True)(jobs)
        return dspy.Prediction(facts=[f.fact for f in facts])


def test_dspy_parallel_inside_a_stage_loses_no_tokens() -> None:
    """DSPy deep-copies the usage tracker into its worker threads and drops the copies; stageflow's
    tracker survives the copy, so both DSPy's totals and the run's table see every call."""
    lm = fan_out_lm()
    subs = [f"sub question {i}" for i in range(8)]
    program = stageflow.SequentialPipeline([stageflow.Stage(_ParallelFacts(), writes=["facts"])])
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        result = program(sub_questions=subs)
    assert lm.calls == 8
    total = result.run.usage.total
    assert total.lm_calls == 8
    assert (total.input_tokens, total.output_tokens) == _tracker_totals(tracker, lm.model)


async def test_dspy_parallel_inside_a_stage_counts_for_that_stage(mode: str) -> None:
    # Reproducer: the calls made in DSPy's worker threads went under path '' of the outermost table,
    # so the stage's usage, the nested pipeline's own table and the profiler showed none of them.
    lm = fan_out_lm()
    subs = [f"sub question {i}" for i in range(6)]
    inner = stageflow.SequentialPipeline([stageflow.Stage(_ParallelFacts(), writes=["facts"])])
    program = stageflow.SequentialPipeline([stageflow.stage(lambda sub_questions: {}, writes=[]), inner])
    with dspy.context(lm=lm), stageflow.profile() as prof:
        for _ in range(2):
            result = await call(program, mode, sub_questions=subs)
    assert {k: v["lm_calls"] for k, v in result.run.usage.to_dict().items()} == {"stages[1].stages[0]": 6}
    nested = result.stage_outputs["stages[1]"]
    assert nested.run.usage["stages[0]"].lm_calls == 6
    assert prof.totals()["lm_calls"] == 12
    assert prof.get_performance_summary()["stages[1].stages[0]"]["lm_calls"] == 12


async def test_hooks_receive_each_calls_own_usage(mode: str) -> None:
    seen: dict[str, dict[str, Any] | None] = {}

    class Listen(stageflow.Hook):
        def after_stage(self, *, path: str, usage: dict[str, Any] | None = None, **future: Any) -> None:
            seen[path] = usage

    lm = fan_out_lm()
    with dspy.context(lm=lm), stageflow.attach_hooks(Listen()):
        result = await call(fan_out_program(), mode, question="q")
    assert seen["stages[0]"] is not None
    assert seen["stages[0]"]["lm_calls"] == 1
    assert seen["stages[1]"] is not None
    assert seen["stages[1]"]["lm_calls"] == WIDTH
    assert seen["stages[1].stage[3]"] == result.run.usage["stages[1].stage[3]"].to_dict()
    assert seen["stages[3]"] is None


async def test_nested_pipelines_inside_a_fan_out_keep_their_usage(mode: str) -> None:
    lm = fan_out_lm()
    item = stageflow.SequentialPipeline([dspy.Predict("sub_question -> fact")])
    program = stageflow.SequentialPipeline([stageflow.ForEach(item, over="sub_questions", collect="fact")])
    with dspy.context(lm=lm), dspy.track_usage() as tracker:
        result = await call(program, mode, sub_questions=["a", "b", "c"])
    assert lm.calls == 3
    total = result.run.usage.total
    assert total.lm_calls == 3
    assert (total.input_tokens, total.output_tokens) == _tracker_totals(tracker, lm.model)
    assert result.run.usage["stages[0].stage[1].stages[0]"].lm_calls == 1


class _CallsAPipeline(dspy.Module):  # type: ignore[misc]
    """A custom module whose own code calls a stageflow pipeline, three times, in turn or through
    ``dspy.Parallel``."""

    def __init__(self, parallel: bool) -> None:
        super().__init__()
        self.sub = stageflow.SequentialPipeline([dspy.Predict("sub_question -> fact")])
        self.parallel = parallel

    def forward(self, question: str) -> dspy.Prediction:
        jobs = [(self.sub, {"sub_question": f"{question} {i}"}) for i in range(3)]
        if self.parallel:
            outs = dspy.Parallel(num_threads=3, disable_progress_bar=True)(jobs)
        else:
            outs = [module(**kw) for module, kw in jobs]
        return dspy.Prediction(facts=[o.fact for o in outs])


@pytest.mark.parametrize("parallel", [False, True], ids=["in turn", "dspy.Parallel"])
async def test_a_pipeline_a_stages_own_code_calls_counts_for_that_stage(mode: str, parallel: bool) -> None:
    # Reproducer: the run's usage was empty (the inner pipeline's table was never joined), and in
    # DSPy's threads each inner call counted twice in its own table and as a run of the profiler.
    lm = fan_out_lm()
    program = stageflow.SequentialPipeline(
        [stageflow.SequentialPipeline([stageflow.Stage(_CallsAPipeline(parallel), writes=["facts"])])]
    )
    with dspy.context(lm=lm):
        await call(program, mode, question="q")
        with stageflow.profile() as prof:
            result = await call(program, mode, question="q")
    assert lm.calls == 6
    assert {k: v["lm_calls"] for k, v in result.run.usage.to_dict().items()} == {"stages[0].stages[0]": 3}
    assert prof.totals()["lm_calls"] == 3
    assert prof.totals()["runs"] == 1
