"""ForEach: one concurrent run per list element, results in input order, failure policies, timeouts."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import ContractError, ForEach, PipelineError, SequentialPipeline, StageError, StageflowError
from stageflow.engine.concurrency import abandoned_threads
from stageflow.testing import FakeLM, call


def upper_or_fail(bad: set[str]) -> stageflow.FunctionStage:
    def work(x: str) -> dict[str, str]:
        if x in bad:
            raise ValueError(f"cannot handle {x}")
        return {"y": x.upper()}

    return stageflow.stage(work, writes=["y"])


# -- order ---------------------------------------------------------------------------------------

DELAYS = {"a": 0.3, "b": 0.2, "c": 0.1, "d": 0.01}


@pytest.mark.parametrize("mode", ["sync", "async", "sync-call-async-stage"])
async def test_results_in_input_order_when_items_finish_in_reverse(mode: str) -> None:
    finished: list[str] = []
    lock = threading.Lock()

    def slow(x: str) -> dict[str, str]:
        time.sleep(DELAYS[x])
        with lock:
            finished.append(x)
        return {"y": x.upper()}

    async def aslow(x: str) -> dict[str, str]:
        await asyncio.sleep(DELAYS[x])
        finished.append(x)
        return {"y": x.upper()}

    body = slow if mode == "sync" else aslow
    p = ForEach(stageflow.stage(body, writes=["y"]), over="xs", item="x", collect="ys")
    items = list(DELAYS)
    result = p(xs=items) if mode == "sync-call-async-stage" else await call(p, mode, xs=items)
    assert finished == ["d", "c", "b", "a"]  # they really finished out of order...
    assert result.ys == ["A", "B", "C", "D"]  # ...and are collected in input order
    assert [r["index"] for r in result.item_results] == [0, 1, 2, 3]
    assert all(r["status"] == "ok" for r in result.item_results)
    assert result.item_errors == []


async def test_lm_items_in_input_order_and_one_call_each(mode: str) -> None:
    lm = FakeLM({"fact": lambda i: "fact about " + i["sub_question"]})
    p = ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts")
    questions = [f"q{i}" for i in range(10)]
    with dspy.context(lm=lm):
        result = await call(p, mode, sub_questions=questions)
    assert result.facts == [f"fact about q{i}" for i in range(10)]
    assert lm.calls == 10
    assert sorted(inputs["sub_question"] for _, inputs in lm.log) == sorted(questions)


async def test_sync_function_items_overlap_under_acall() -> None:
    active = [0]
    peak = [0]
    lock = threading.Lock()

    def work(x: str) -> dict[str, str]:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return {"y": x}

    p = ForEach(stageflow.stage(work, writes=["y"]), over="xs", item="x", collect="ys")
    result = await p.acall(xs=["a", "b", "c", "d"])
    assert result.ys == ["a", "b", "c", "d"]
    assert peak[0] == 4  # a plain function runs on a worker thread under acall, not on the loop


async def test_non_blocking_function_items_run_inline_on_the_loop_under_acall() -> None:
    loop_thread = threading.current_thread()
    threads: list[threading.Thread] = []

    def work(x: str) -> dict[str, str]:
        threads.append(threading.current_thread())
        return {"y": x.upper()}

    p = ForEach(stageflow.stage(work, writes=["y"], blocking=False), over="xs", item="x", collect="ys")
    result = await p.acall(xs=["a", "b", "c"])
    assert result.ys == ["A", "B", "C"]
    assert threads == [loop_thread] * 3


# -- item names and collection ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("over", "item"),
    [("sub_questions", "sub_question"), ("queries", "query"), ("facts", "fact"), ("address", "address_item")],
)
def test_item_name_defaults_to_the_singular_of_over(over: str, item: str) -> None:
    p = ForEach(stageflow.stage(lambda **kw: {"out": 1}, writes=["out"]), over=over)
    assert p.item == item


@pytest.mark.parametrize(
    ("over", "reads"),
    [
        # (helper 114: -es plurals gave boxe, addresse; helper 115: a rule that gave box gave cach for
        # caches, whose singular 0.1 got right: the singular the stage reads is taken)
        ("boxes", "box"),
        ("addresses", "address"),
        ("matches", "match"),
        ("caches", "cache"),
        ("niches", "niche"),
        ("quizzes", "quiz"),
        ("movies", "movie"),
        ("queries", "query"),
        ("news", "news_item"),
        ("facts", "fact"),
    ],
)
async def test_the_default_item_is_the_singular_the_stage_reads(mode: str, over: str, reads: str) -> None:
    def measure(**kw: Any) -> dict[str, Any]:
        return {"size": len(kw[reads])}

    work = stageflow.stage(measure, reads=[reads], writes=["size"])
    each = ForEach(work, over=over, collect="size")
    assert each.item == reads
    assert (await call(each, mode, **{over: ["ab", "c"]})).size == [2, 1]


async def test_default_item_name_feeds_the_stage(mode: str) -> None:
    lm = FakeLM({"fact": lambda i: i["sub_question"] + "!"})
    p = ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions")
    with dspy.context(lm=lm):
        result = await call(p, mode, sub_questions=["x", "y"])
    assert result.facts == ["x!", "y!"]  # default collect: fact -> facts


async def test_a_collected_field_renamed_at_the_boundary_may_have_a_prediction_attributes_name(
    mode: str,
) -> None:
    # (helper 115: a check that refused result fields named like a Prediction attribute (labels)
    # refused this too, which its own hint recommends: it was taken back)
    each = ForEach(stageflow.stage(lambda text: {"label": text.upper()}, writes=["label"]), over="texts")
    assert each.collect == {"label": "labels"}
    pipeline = SequentialPipeline([stageflow.Stage(each, outputs={"labels": "label_list"})])
    assert (await call(pipeline, mode, texts=["a", "b"])).label_list == ["A", "B"]


def test_default_collect_names() -> None:
    p = ForEach(dspy.Predict("sub_question -> fact, status"), over="sub_questions")
    assert p.collect == {"fact": "facts", "status": "status_list"}


async def test_collect_as_a_mapping_of_several_outputs(mode: str) -> None:
    lm = FakeLM({"fact": lambda i: "f-" + i["sub_question"], "source": lambda i: "s-" + i["sub_question"]})
    p = ForEach(
        dspy.Predict("sub_question -> fact, source"),
        over="sub_questions",
        collect={"fact": "facts", "source": "sources"},
    )
    with dspy.context(lm=lm):
        result = await call(p, mode, sub_questions=["a", "b", "c"])
    assert result.facts == ["f-a", "f-b", "f-c"]
    assert result.sources == ["s-a", "s-b", "s-c"]
    assert lm.calls == 3  # one call per item, both outputs from it


def test_collect_string_needs_a_single_output() -> None:
    with pytest.raises(stageflow.ConfigurationError) as ei:
        ForEach(dspy.Predict("sub_question -> fact, source"), over="sub_questions", collect="facts")
    assert ei.value.code == "bad_option"


async def test_shared_state_fields_reach_every_item(mode: str) -> None:
    lm = FakeLM({"fact": lambda i: f"{i['question']}/{i['sub_question']}"})
    p = SequentialPipeline(
        [
            stageflow.stage(
                lambda question: {"sub_questions": [question + "1", question + "2"]}, writes=["sub_questions"]
            ),
            ForEach(dspy.Predict("question, sub_question -> fact"), over="sub_questions", collect="facts"),
        ]
    )
    with dspy.context(lm=lm):
        result = await call(p, mode, question="Q")
    assert result.facts == ["Q/Q1", "Q/Q2"]
    assert [inputs["question"] for _, inputs in lm.log] == ["Q", "Q"]


# -- edge inputs -----------------------------------------------------------------------------------------


async def test_empty_list_gives_empty_lists_and_no_calls(mode: str) -> None:
    lm = FakeLM({"fact": "f", "source": "s"})
    p = ForEach(
        dspy.Predict("sub_question -> fact, source"),
        over="sub_questions",
        collect={"fact": "facts", "source": "sources"},
    )
    with dspy.context(lm=lm):
        result = await call(p, mode, sub_questions=[])
    assert result.facts == []
    assert result.sources == []
    assert lm.calls == 0
    assert result.item_results == []


@pytest.mark.parametrize("value", ["a string", 3, None, {"a": 1}])
async def test_non_list_input_is_a_contract_error(mode: str, value: Any) -> None:
    lm = FakeLM({"fact": "f"})
    p = ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions")
    with dspy.context(lm=lm), pytest.raises(ContractError) as ei:
        await call(p, mode, sub_questions=value)
    assert ei.value.code == "not_a_list"
    assert ei.value.field == "sub_questions"
    assert lm.calls == 0


async def test_non_list_from_an_upstream_stage_names_the_foreach_path(mode: str) -> None:
    lm = FakeLM({"fact": "f"})
    p = SequentialPipeline(
        [
            stageflow.stage(lambda question: {"sub_questions": "not a list"}, writes=["sub_questions"]),
            ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions"),
        ]
    )
    with dspy.context(lm=lm), pytest.raises(ContractError) as ei:
        await call(p, mode, question="q")
    assert ei.value.code == "not_a_list"
    assert ei.value.stage_path == "stages[1]"
    assert lm.calls == 0


async def test_missing_over_field_fails_before_any_lm_call(mode: str) -> None:
    lm = FakeLM({"answer": "a", "fact": "f"})
    p = SequentialPipeline(
        [
            dspy.Predict("question -> answer"),
            ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions"),
        ]
    )
    with dspy.context(lm=lm), pytest.raises(ContractError) as ei:
        await call(p, mode, question="q")
    assert ei.value.field == "sub_questions"
    assert ei.value.code == "missing_input"
    assert lm.calls == 0  # the first stage did not run either


# -- failure policies ------------------------------------------------------------------------------------


async def test_by_default_a_failed_item_fails_the_foreach(mode: str) -> None:
    p = ForEach(upper_or_fail({"b"}), over="xs", item="x", collect="ys")
    with pytest.raises(StageError) as ei:
        await call(p, mode, xs=["a", "b", "c"])
    assert ei.value.stage_path == "stage[1]"


async def test_on_error_collect_leaves_none_and_lists_the_error(mode: str) -> None:
    p = ForEach(upper_or_fail({"b"}), over="xs", item="x", collect="ys", on_error="collect")
    result = await call(p, mode, xs=["a", "b", "c"])
    assert result.ys == ["A", None, "C"]
    assert [(e.stage, e.kind) for e in result.run.events] == [("stage[1]", "item_failed")]
    assert len(result.item_errors) == 1
    err = result.item_errors[0]
    assert err["index"] == 1
    assert err["status"] == "error"
    assert isinstance(err["error"], StageError)
    assert err["error"].stage_path == "stage[1]"
    assert isinstance(err["error"].__cause__, ValueError)
    assert [r["status"] for r in result.item_results] == ["ok", "error", "ok"]


async def test_on_error_skip_drops_failed_items(mode: str) -> None:
    p = ForEach(upper_or_fail({"b", "d"}), over="xs", item="x", collect="ys", on_error="skip")
    result = await call(p, mode, xs=["a", "b", "c", "d", "e"])
    assert result.ys == ["A", "C", "E"]
    assert [e["index"] for e in result.item_errors] == [1, 3]


async def test_on_error_fail_fast_raises_naming_the_item(mode: str) -> None:
    p = ForEach(upper_or_fail({"c"}), over="xs", item="x", collect="ys", on_error="fail_fast")
    with pytest.raises(StageflowError) as ei:
        await call(p, mode, xs=["a", "b", "c", "d"])
    assert ei.value.stage_path == "stage[2]"
    assert "stage[2]" in str(ei.value)
    assert isinstance(ei.value.__cause__, ValueError)


async def test_fail_fast_inside_a_pipeline_names_the_full_item_path(mode: str) -> None:
    p = SequentialPipeline(
        [
            stageflow.stage(lambda question: {"xs": ["a", "b", "c"]}, writes=["xs"]),
            ForEach(upper_or_fail({"b"}), over="xs", item="x", collect="ys", on_error="fail_fast"),
        ]
    )
    with pytest.raises(StageError) as ei:
        await call(p, mode, question="q")
    assert ei.value.stage_path == "stages[1].stage[1]"


async def test_async_fail_fast_cancels_the_running_items() -> None:
    cancelled: list[str] = []

    async def work(x: str) -> dict[str, str]:
        if x == "bad":
            await asyncio.sleep(0.01)
            raise ValueError("bad")
        try:
            await asyncio.sleep(2)
        except asyncio.CancelledError:
            cancelled.append(x)
            raise
        return {"y": x}

    p = ForEach(stageflow.stage(work, writes=["y"]), over="xs", item="x", on_error="fail_fast")
    with pytest.raises(StageError) as ei:
        await p.acall(xs=["slow1", "bad", "slow2"])
    assert ei.value.stage_path == "stage[1]"
    assert sorted(cancelled) == ["slow1", "slow2"]


def test_sync_fail_fast_raises_without_waiting_for_a_slow_item() -> None:
    release = threading.Event()
    slow_done = threading.Event()

    def work(x: str) -> dict[str, str]:
        if x == "slow":
            release.wait(2.0)
            slow_done.set()
        elif x == "bad":
            time.sleep(0.01)
            raise ValueError("bad")
        return {"y": x}

    p = ForEach(stageflow.stage(work, writes=["y"]), over="xs", item="x", on_error="fail_fast")
    before = abandoned_threads()
    try:
        with pytest.raises(StageError) as ei:
            p(xs=["slow", "bad", "ok"])
        assert not slow_done.is_set()  # raised while the slow item was still running
        assert abandoned_threads() == before + 1  # ...which was abandoned, and reported
    finally:
        release.set()
    assert ei.value.stage_path == "stage[1]"


def test_sync_fail_fast_does_not_wait_for_a_slow_item_on_the_calling_thread() -> None:
    caller = threading.current_thread()
    release = threading.Event()
    slow_done = threading.Event()

    def work(x: str) -> dict[str, str]:
        if threading.current_thread() is caller:
            release.wait(1.0)  # slow only when the calling thread runs it
            slow_done.set()
            return {"y": x}
        time.sleep(0.05)
        raise ValueError(f"bad {x}")

    p = ForEach(stageflow.stage(work, writes=["y"]), over="xs", item="x", on_error="fail_fast")
    try:
        with pytest.raises(StageError):
            p(xs=["a", "b", "c", "d"])
        assert not slow_done.is_set(), "fail_fast waited for a slow item before raising"
    finally:
        release.set()


@pytest.mark.parametrize("policy", ["collect", "skip"])
async def test_all_items_failing_is_a_pipeline_error(mode: str, policy: str) -> None:
    p = ForEach(upper_or_fail({"a", "b", "c"}), over="xs", item="x", on_error=policy)  # type: ignore[arg-type]
    with pytest.raises(PipelineError) as ei:
        await call(p, mode, xs=["a", "b", "c"])
    assert ei.value.code == "all_failed"
    assert ei.value.field == "xs"
    assert len(ei.value.errors) == 3
    assert [e.stage_path for e in ei.value.errors] == ["stage[0]", "stage[1]", "stage[2]"]
    assert all(isinstance(e.__cause__, ValueError) for e in ei.value.errors)


# -- timeouts --------------------------------------------------------------------------------------------


def test_sync_timeout_marks_the_item_and_abandons_its_thread() -> None:
    release = threading.Event()

    def work(x: str) -> dict[str, str]:
        if x == "slow":
            release.wait(2.0)
        return {"y": x.upper()}

    p = ForEach(
        stageflow.stage(work, writes=["y"]),
        over="xs",
        item="x",
        collect="ys",
        timeout=0.1,
        on_error="collect",
    )
    before = abandoned_threads()
    try:
        result = p(xs=["a", "slow", "c"])
    finally:
        release.set()
    assert result.ys == ["A", None, "C"]
    assert [r["status"] for r in result.item_results] == ["ok", "timeout", "ok"]
    assert isinstance(result.item_errors[0]["error"], TimeoutError)
    assert result.item_errors[0]["index"] == 1
    assert abandoned_threads() == before + 1


def test_sync_timeout_with_more_items_than_threads_still_runs_every_item() -> None:
    release = threading.Event()

    def work(x: str) -> dict[str, str]:
        if x.startswith("slow"):
            release.wait(2.0)
        return {"y": x}

    items = ["slow0", "a", "b", "c", "d", "e"]
    p = ForEach(
        stageflow.stage(work, writes=["y"]),
        over="xs",
        item="x",
        collect="ys",
        timeout=0.1,
        max_concurrency=2,
        on_error="collect",
    )
    before = abandoned_threads()
    try:
        result = p(xs=items)
    finally:
        release.set()
    assert result.ys == [None, "a", "b", "c", "d", "e"]  # a fresh worker replaced the stuck one
    assert [r["status"] for r in result.item_results] == ["timeout"] + ["ok"] * 5
    assert abandoned_threads() == before + 1


@pytest.mark.parametrize("mode", ["async", "sync-call-async-stage"])
async def test_async_timeout_cancels_the_item_task(mode: str) -> None:
    cancelled: list[str] = []
    finished: list[str] = []

    async def work(x: str) -> dict[str, str]:
        try:
            await asyncio.sleep(2.0 if x == "slow" else 0.0)
        except asyncio.CancelledError:
            cancelled.append(x)
            raise
        finished.append(x)
        return {"y": x.upper()}

    p = ForEach(
        stageflow.stage(work, writes=["y"]),
        over="xs",
        item="x",
        collect="ys",
        timeout=0.1,
        on_error="collect",
    )
    before = abandoned_threads()
    result = p(xs=["a", "slow", "c"]) if mode != "async" else await p.acall(xs=["a", "slow", "c"])
    assert result.ys == ["A", None, "C"]
    assert [r["status"] for r in result.item_results] == ["ok", "timeout", "ok"]
    assert isinstance(result.item_errors[0]["error"], TimeoutError)
    assert cancelled == ["slow"]
    assert sorted(finished) == ["a", "c"]
    assert abandoned_threads() == before  # tasks are cancelled, not abandoned


async def test_fail_fast_timeout_raises_a_stageflow_error_naming_the_item(mode: str) -> None:
    release = threading.Event()

    def work(x: str) -> dict[str, str]:
        if x == "slow":
            release.wait(2.0)
        return {"y": x}

    async def awork(x: str) -> dict[str, str]:
        await asyncio.sleep(2.0 if x == "slow" else 0.0)
        return {"y": x}

    body = work if mode == "sync" else awork
    p = ForEach(stageflow.stage(body, writes=["y"]), over="xs", item="x", timeout=0.1, on_error="fail_fast")
    try:
        with pytest.raises(StageflowError) as ei:
            await call(p, mode, xs=["a", "slow", "c"])
    finally:
        release.set()
    assert ei.value.stage_path == "stage[1]"


def test_when_the_stage_reads_no_singular_the_message_names_the_ones_it_could_read() -> None:
    # (helper 116: the message named only 'movy', the first candidate)
    def wrong(thing: str) -> dict[str, str]:
        return {"x": thing}

    with pytest.raises(ContractError) as info:
        SequentialPipeline(
            [ForEach(stageflow.stage(wrong, writes=["x"]), over="movies", collect={"x": "xs"})]
        )
    assert info.value.code == "item_not_read"
    assert "'movy' (the default; a stage reading 'movie' or 'movies_item' would get it so)" in str(info.value)
    assert "item='thing'" in str(info.value)
    named = ForEach(stageflow.stage(wrong, writes=["x"]), over="movies", item="film", collect={"x": "xs"})
    with pytest.raises(ContractError) as given:
        SequentialPipeline([named])
    assert "as 'film', which" in str(given.value)  # (a name of yours: nothing about defaults)
