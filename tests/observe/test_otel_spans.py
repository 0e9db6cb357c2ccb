"""OpenTelemetry spans: one per run, stage and LM call, with the right parents across threads and tasks."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dspy
import pytest
from otel_kit import is_lm_span, is_run_span, parent_of, stage_spans
from usage_kit import WIDTH, fan_out_lm, fan_out_program

import stageflow
from stageflow.observe import otel
from stageflow.testing import FakeLM, call

pytestmark = pytest.mark.integration  # the real OpenTelemetry SDK


def _expected_parent(path: str) -> str | None:
    """The stage path a stage span of :func:`fan_out_program` must hang under (``None``: the run)."""
    for composite in ("stages[1]", "stages[2]"):
        if path.startswith(composite + "."):
            return composite
    return None


def _check_tree(spans: list[Any]) -> tuple[Any, dict[str, Any], list[Any]]:
    runs = [s for s in spans if is_run_span(s)]
    assert len(runs) == 1
    run = runs[0]
    assert run.parent is None
    assert {s.context.trace_id for s in spans} == {run.context.trace_id}
    stages = stage_spans(spans)
    for path, span in stages.items():
        want = _expected_parent(path)
        assert parent_of(span, spans) is (run if want is None else stages[want]), path
    lms = [s for s in spans if is_lm_span(s)]
    for span in lms:
        assert parent_of(span, spans) is stages[span.attributes["stageflow.stage.path"]]
    return run, stages, lms


async def test_32_way_fan_out_every_span_has_the_runs_trace_and_its_parent(mode: str, otel_sdk: Any) -> None:
    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider)
    lm = fan_out_lm(latency=0.002)
    with dspy.context(lm=lm):
        await call(fan_out_program(), mode, question="Where is the Louvre?")
    assert lm.peak_active > 1  # the items really ran concurrently
    spans = list(exporter.get_finished_spans())
    _, stages, lms = _check_tree(spans)
    assert len(stages) == 4 + WIDTH + 3
    assert sorted(p for p in stages if p.startswith("stages[1].")) == sorted(
        f"stages[1].stage[{i}]" for i in range(WIDTH)
    )
    assert len(lms) == lm.calls == 1 + WIDTH + 3
    assert len(spans) == 1 + len(stages) + len(lms)


def test_concurrent_calls_get_a_trace_each(otel_sdk: Any) -> None:
    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider)
    lm = fan_out_lm(latency=0.001)
    program = fan_out_program()

    def one(i: int) -> Any:
        with dspy.context(lm=lm):
            return program(question=f"question {i}")

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(one, range(4)))
    spans = list(exporter.get_finished_spans())
    traces: dict[int, list[Any]] = {}
    for s in spans:
        traces.setdefault(s.context.trace_id, []).append(s)
    assert len(traces) == 4
    for group in traces.values():
        _check_tree(group)


async def test_a_callers_span_is_the_runs_parent(mode: str, otel_sdk: Any) -> None:
    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider)
    tracer = provider.get_tracer("app")
    program = stageflow.SequentialPipeline(
        [stageflow.stage(lambda x: {"y": x + 1}, writes=["y"], name="inc")]
    )
    with tracer.start_as_current_span("request") as outer:
        await call(program, mode, x=1)
    spans = list(exporter.get_finished_spans())
    run = next(s for s in spans if is_run_span(s))
    assert run.parent is not None
    assert run.parent.span_id == outer.get_span_context().span_id
    inc_span = next(s for s in spans if s.name == "inc")
    assert parent_of(inc_span, spans) is run
    # The caller's context is back as it was.
    from opentelemetry import trace

    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_attributes_of_both_conventions_are_set_when_spans_start(mode: str, otel_sdk: Any) -> None:
    from opentelemetry.sdk.trace import SpanProcessor

    provider, exporter = otel_sdk
    at_start: dict[str, dict[str, Any]] = {}

    class AtStart(SpanProcessor):  # type: ignore[misc]
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            at_start[span.name] = dict(span.attributes)

    provider.add_span_processor(AtStart())
    otel.instrument(tracer_provider=provider)
    lm = FakeLM({"answer": "Paris"})
    program = stageflow.SequentialPipeline(
        [dspy.Predict("question -> answer"), stageflow.stage(lambda answer: {"n": len(answer)}, writes=["n"])]
    )
    with dspy.context(lm=lm):
        await call(program, mode, question="q")
    run = at_start["invoke_workflow SequentialPipeline"]
    assert run["gen_ai.operation.name"] == "invoke_workflow"
    assert run["gen_ai.workflow.name"] == "SequentialPipeline"
    assert run["openinference.span.kind"] == "CHAIN"
    predict = at_start["stages[0]"]
    assert predict["stageflow.stage.path"] == "stages[0]"
    assert predict["gen_ai.request.model"] == lm.model
    assert predict["openinference.span.kind"] == "CHAIN"  # its LM call is the LLM span
    assert at_start["stages[1]"]["stageflow.stage.type"] == "FunctionStage"  # a lambda: named by its path
    chat = at_start[f"chat {lm.model}"]
    assert chat["gen_ai.operation.name"] == "chat"
    assert chat["gen_ai.request.model"] == lm.model
    assert chat["openinference.span.kind"] == "LLM"
    assert chat["stageflow.stage.path"] == "stages[0]"
    # Token counts arrive when the call ends, on the LM span only (counted once by any tool).
    spans = {s.name: s for s in exporter.get_finished_spans()}
    ended = spans[f"chat {lm.model}"].attributes
    usage = spans["stages[0]"].attributes
    assert ended["gen_ai.usage.input_tokens"] == usage["stageflow.usage.input_tokens"] > 0
    assert ended["gen_ai.usage.output_tokens"] == usage["stageflow.usage.output_tokens"] > 0
    assert "gen_ai.usage.input_tokens" not in usage
    assert spans["invoke_workflow SequentialPipeline"].attributes["stageflow.usage.lm_calls"] == 1


async def test_without_lm_spans_tokens_go_on_the_predictor_stage(mode: str, otel_sdk: Any) -> None:
    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider, lm_spans=False)
    lm = FakeLM({"answer": "Paris"})
    with dspy.context(lm=lm):
        result = await call(
            stageflow.SequentialPipeline([dspy.Predict("question -> answer")]), mode, question="q"
        )
    spans = list(exporter.get_finished_spans())
    assert not [s for s in spans if is_lm_span(s)]
    stage = stage_spans(spans)["stages[0]"].attributes
    assert stage["openinference.span.kind"] == "LLM"
    assert stage["llm.model_name"] == lm.model
    assert stage["gen_ai.usage.input_tokens"] == result.run.usage.total.input_tokens
    assert stage["llm.token_count.completion"] == result.run.usage.total.output_tokens


async def test_nested_pipelines_and_readable_names(mode: str, otel_sdk: Any) -> None:
    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider)
    inner = stageflow.SequentialPipeline(
        [stageflow.stage(lambda x: {"y": x * 2}, writes=["y"], name="double")]
    )
    program = stageflow.SequentialPipeline([inner, stageflow.stage(lambda y: {"z": y + 1}, writes=["z"])])
    assert (await call(program, mode, x=2)).z == 5
    spans = list(exporter.get_finished_spans())
    names = sorted(s.name for s in spans)
    # One span for the nested pipeline (its stage), none for its own run.
    assert names == ["double", "invoke_workflow SequentialPipeline", "stages[0]", "stages[1]"]
    by_name = {s.name: s for s in spans}
    assert by_name["double"].attributes["stageflow.stage.path"] == "stages[0].stages[0]"
    assert by_name["double"].attributes["stageflow.stage.name"] == "double"
    assert parent_of(by_name["double"], spans) is by_name["stages[0]"]
    assert by_name["stages[0]"].attributes["stageflow.stage.type"] == "SequentialPipeline"


async def test_failures_mark_the_stage_and_the_run(mode: str, otel_sdk: Any) -> None:
    from opentelemetry.trace import StatusCode

    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider)

    def explode(x: int) -> dict[str, Any]:
        raise ValueError("bad input; api_key=sk-abcdefghijklmnopqrst")

    program = stageflow.SequentialPipeline([stageflow.stage(explode, writes=["y"])])
    with pytest.raises(stageflow.StageError):
        await call(program, mode, x=1)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for name in ("explode", "invoke_workflow SequentialPipeline"):
        span = spans[name]
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes["error.type"] == "ValueError"
        event = next(e for e in span.events if e.name == "exception")
        assert "bad input" in event.attributes["exception.message"]
        assert "sk-abc" not in event.attributes["exception.message"]
        assert "sk-abc" not in (span.status.description or "")


async def test_retries_and_cache_hits_are_attributes(mode: str, otel_sdk: Any) -> None:
    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider)
    lm = FakeLM({"answer": "42", "check": "ok"}, fail_times=1)
    program = stageflow.SequentialPipeline(
        [
            stageflow.Stage(
                dspy.Predict("question -> answer"),
                retry=stageflow.RetryPolicy(max_attempts=2, sleep=lambda s: None, retry_on=lambda e: True),
            ),
            stageflow.CachedStage(dspy.Predict("answer -> check")),
        ]
    )
    with dspy.context(lm=lm):
        await call(program, mode, question="q")
        exporter.clear()
        await call(program, mode, question="q")
    second = stage_spans(list(exporter.get_finished_spans()))
    assert second["stages[1]"].attributes["stageflow.cache_hit"] is True
    assert "stageflow.retries" not in second["stages[0]"].attributes  # none: the attribute is left out
    lm.fail_times = lm.calls + 1
    exporter.clear()
    with dspy.context(lm=lm):
        await call(program, mode, question="q")
    third = stage_spans(list(exporter.get_finished_spans()))
    assert third["stages[0]"].attributes["stageflow.retries"] == 1


def test_uninstrument_and_reinstrument(otel_sdk: Any) -> None:
    provider, exporter = otel_sdk
    program = stageflow.SequentialPipeline([stageflow.stage(lambda x: {"y": x}, writes=["y"])])
    first = otel.instrument(tracer_provider=provider)
    second = otel.instrument(tracer_provider=provider, record_content=True)
    assert first is not None
    assert second is not None
    from stageflow.engine.hooks import global_hooks

    assert [h for h in global_hooks() if isinstance(h, otel.OtelHook)] == [second]
    program(x=1)
    assert len(exporter.get_finished_spans()) == 2
    otel.uninstrument()
    assert not otel.is_instrumented()
    program(x=1)
    assert len(exporter.get_finished_spans()) == 2


def test_async_stages_on_stageflows_own_event_loop(otel_sdk: Any) -> None:
    """``async def`` stages in a sync call run on stageflow's background loop: parents still hold."""
    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider)

    async def slow(item: str) -> dict[str, Any]:
        await asyncio.sleep(0.001)
        return {"out": item.upper()}

    program = stageflow.SequentialPipeline(
        [stageflow.ForEach(stageflow.stage(slow, writes=["out"]), over="words", item="item", collect="out")]
    )
    assert program(words=[f"w{i}" for i in range(WIDTH)]).out == [f"W{i}" for i in range(WIDTH)]
    spans = list(exporter.get_finished_spans())
    run = next(s for s in spans if is_run_span(s))
    foreach = stage_spans(spans)["stages[0]"]
    items = [s for s in spans if s.attributes.get("stageflow.stage.path", "").startswith("stages[0].")]
    assert len(items) == WIDTH
    assert {s.context.trace_id for s in spans} == {run.context.trace_id}
    assert all(parent_of(s, spans) is foreach for s in items)


async def test_cancelled_branches_still_end_their_spans(otel_sdk: Any) -> None:
    """A fail-fast ForEach cancels the other items' tasks: their spans end as they are cancelled,
    with an error status and marked cancelled (none is left for the run's end to close)."""
    from opentelemetry.trace import StatusCode

    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider)

    async def item(x: int) -> dict[str, Any]:
        if x == 0:
            await asyncio.sleep(0.01)
            raise ValueError("boom")
        await asyncio.sleep(5)
        return {"y": x}

    program = stageflow.SequentialPipeline(
        [stageflow.ForEach(stageflow.stage(item, writes=["y"]), over="xs", item="x", collect="y")]
    )
    with pytest.raises(stageflow.StageError):
        await program.acall(xs=[0, 1, 2])
    spans = list(exporter.get_finished_spans())
    items = [s for s in spans if s.name == "item"]
    assert len(items) == 3
    assert all(s.status.status_code is StatusCode.ERROR for s in items)
    assert sorted(bool(s.attributes.get("stageflow.cancelled")) for s in items) == [False, True, True]
    assert not any(s.attributes.get("stageflow.abandoned") for s in items)
    run = next(s for s in spans if is_run_span(s))
    assert all(s.context.trace_id == run.context.trace_id for s in spans)


def test_an_abandoned_thread_finishing_late_ends_nothing_twice(
    otel_sdk: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import threading

    provider, exporter = otel_sdk
    otel.instrument(tracer_provider=provider)
    release = threading.Event()
    late_hooks_done = threading.Event()

    class Late(stageflow.Hook):
        """Runs after the process-wide OpenTelemetry hook for the abandoned item."""

        def after_stage(self, *, path: str, **future: Any) -> None:
            if path == "stages[0].stage[1]":
                late_hooks_done.set()

    def slow(x: int) -> dict[str, Any]:
        if x == 1:
            release.wait(5)
        return {"y": x}

    item = stageflow.stage(slow, writes=["y"])
    program = stageflow.SequentialPipeline(
        [stageflow.ForEach(item, over="xs", item="x", collect="y", timeout=0.05)]
    )
    with caplog.at_level(logging.WARNING), stageflow.attach_hooks(Late()):
        with pytest.raises(stageflow.StageTimeoutError):
            program(xs=[0, 1])
        assert not late_hooks_done.is_set()
        release.set()
        assert late_hooks_done.wait(5)
    spans = [s for s in exporter.get_finished_spans() if s.name == "slow"]
    assert len(spans) == 2
    assert [bool(s.attributes.get("stageflow.abandoned")) for s in spans] == [False, True]
    assert "ended span" not in caplog.text
