"""Tracer spans (ids and parents across threads and event loops), recorded graphs, safe JSON."""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from observe_kit import fn

import stageflow
from stageflow.observe import graph as graph_pkg
from stageflow.observe.graph import graph_of
from stageflow.observe.tracer import Tracer

MODES = ["sync", "async"]


async def call(p: Any, mode: str, **inputs: Any) -> Any:
    return p(**inputs) if mode == "sync" else await p.acall(**inputs)


def opened(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {e["span"]: e for e in events if e["event"] in ("input", "stage_start")}


def ancestors(spans: dict[int, dict[str, Any]], sid: int) -> list[int]:
    chain = []
    parent = spans[sid]["parent"]
    while parent is not None:
        chain.append(parent)
        parent = spans[parent]["parent"]
    return chain


def fan_out_pipeline() -> stageflow.SequentialPipeline:
    per_item = stageflow.SequentialPipeline(
        [
            fn("a", ["item"], ["x"]),
            stageflow.stage(lambda x: time.sleep(0.002) or {"y": f"{x}!"}, writes=["y"]),
        ]
    )
    return stageflow.SequentialPipeline(
        [
            stageflow.stage(lambda n: {"xs": list(range(n))}, writes=["xs"], name="make"),
            stageflow.ForEach(per_item, over="xs", item="item", collect={"y": "ys"}),
        ]
    )


@pytest.mark.parametrize("mode", MODES)
async def test_32_way_foreach_spans_have_the_right_parents(mode: str) -> None:
    p = fan_out_pipeline()
    with stageflow.trace() as tracer:
        result = await call(p, mode, n=32)
    assert len(result.ys) == 32
    spans = opened(tracer.events)
    # The ForEach stage span holds the ForEach's own call, which holds the items.
    [foreach_stage] = [s for s in spans.values() if s["stage"] == "stages[1]" and s["event"] == "stage_start"]
    [foreach] = [s for s in spans.values() if s["stage"] == "stages[1]" and s["event"] == "input"]
    assert foreach["parent"] == foreach_stage["span"]
    items = [
        s for s in spans.values() if s["event"] == "stage_start" and s["stage"].startswith("stages[1].stage[")
    ]
    per_item = [s for s in items if s["stage"].count(".") == 1]
    assert len(per_item) == 32
    assert {s["parent"] for s in per_item} == {foreach["span"]}
    for s in items:
        if s["stage"].count(".") == 2:  # stages[1].stage[i].stages[k]: inside item i
            item_prefix = s["stage"].rsplit(".", 1)[0]
            parent = spans[s["parent"]]
            # The item's own pipeline call sits between the item span and its stages.
            assert parent["event"] == "input"
            assert parent["stage"] == item_prefix
            assert spans[parent["parent"]]["stage"] == item_prefix
    if mode == "sync":
        assert len({s["thread"] for s in per_item}) > 1  # really on several threads
    closing = Counter(e["span"] for e in tracer.events if e["event"] in ("stage_end", "output"))
    assert set(closing) == set(spans)
    assert set(closing.values()) == {1}


def test_concurrent_calls_of_one_pipeline_stay_apart() -> None:
    p = fan_out_pipeline()
    barrier = threading.Barrier(4)

    def run(n: int) -> None:
        barrier.wait()
        p(n=n)

    with stageflow.trace() as tracer:  # threads that copy the context see the tracer
        threads = [
            threading.Thread(target=contextvars.copy_context().run, args=(run, n)) for n in (3, 5, 7, 9)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    spans = opened(tracer.events)
    roots = [sid for sid, s in spans.items() if s["parent"] is None]
    assert len(roots) == 4
    size = Counter(ancestors(spans, sid)[-1] if spans[sid]["parent"] is not None else sid for sid in spans)
    # Each call: its own span, 2 stages and the ForEach's call; per item: the item, its pipeline
    # call and its 2 stages.
    assert sorted(size.values()) == sorted(4 + 4 * n for n in (3, 5, 7, 9))


async def test_loop_iterations_are_separate_spans_and_async_calls_stay_apart() -> None:
    loop = stageflow.IterativePipeline(
        [fn("step", ["q"], ["quality_score"], 0.1)], lambda s: False, max_iterations=4
    )
    with stageflow.trace() as tracer:
        await asyncio.gather(loop.acall(q="a"), loop.acall(q="b"))
    spans = opened(tracer.events)
    roots = {sid for sid, s in spans.items() if s["parent"] is None}
    steps = [s for s in spans.values() if s["stage"] == "stages[0]"]
    assert len(steps) == 8
    assert Counter(s["parent"] for s in steps) == dict.fromkeys(roots, 4)


def test_the_outermost_pipeline_graph_is_recorded_once() -> None:
    p, other = fan_out_pipeline(), stageflow.SequentialPipeline([fn("solo", ["x"], ["y"])])
    with stageflow.trace() as tracer:
        p(n=2)
        p(n=1)
        other(x=1)
    inputs = [e for e in tracer.events if e["event"] == "input"]
    assert [e.get("graph") for e in inputs if e["stage"] == ""] == ["g1", "g1", "g2"]
    assert all("graph" not in e for e in inputs if e["stage"])
    assert tracer.graphs == {"g1": graph_of(p).to_dict(), "g2": graph_of(other).to_dict()}
    doc = tracer.to_dict()
    assert doc["version"] == 2
    assert doc["graphs"] == tracer.graphs
    doc["graphs"]["g1"]["nodes"].clear()  # a copy: the shared graph is untouched
    assert tracer.graphs["g1"]["nodes"]
    p.add_stage(fn("extra", ["ys"], ["z"]))
    with stageflow.trace() as later:
        p(n=1)
    assert later.graphs["g1"]["nodes"][-2]["label"] == "extra()"  # rebuilt after the change


def test_no_graph_when_disabled_and_a_failing_walk_never_breaks_a_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    p = stageflow.SequentialPipeline([fn("a", ["x"], ["y"])])
    with stageflow.trace(record_graph=False) as tracer:
        p(x=1)
    assert tracer.graphs == {}
    assert "graph" not in tracer.events[0]

    def broken(pipeline: Any, **kw: Any) -> Any:
        raise RuntimeError("walk failed")

    monkeypatch.setattr(graph_pkg, "graph_of", broken)
    fresh = stageflow.SequentialPipeline([fn("b", ["x"], ["y"])])
    with stageflow.trace() as tracer:
        assert fresh(x=1).y == "b"
    assert tracer.graphs == {}
    assert "graph" not in tracer.events[0]
    assert "no graph for SequentialPipeline" in caplog.text


def test_save_handles_any_string_and_non_finite_numbers(tmp_path: Path) -> None:
    p = stageflow.SequentialPipeline([stageflow.stage(lambda text: {"out": text + "\udfff"}, writes=["out"])])
    with stageflow.trace() as tracer:
        p(text="lone \ud800 surrogate, é, 😀", score=float("nan"))
    target = tracer.save(tmp_path / "trace.json")
    raw = target.read_bytes().decode("utf-8")  # valid UTF-8
    doc = json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    first = doc["events"][0]["inputs"]
    assert first["text"] == "lone \ud800 surrogate, é, 😀"  # exactly what went in
    assert first["score"] == "nan"
    assert doc["events"][-1]["outputs"]["out"].endswith("\udfff")
    assert "é, 😀" in raw  # readable text stays readable


def test_usage_reported_by_the_engine_is_recorded() -> None:
    tracer = Tracer()
    usage = {"lm_calls": 2, "input_tokens": 10, "output_tokens": 4, "cost": None, "cache_hits": 1}
    tracer.before_stage(path="stages[0]", stage=object(), inputs={})
    tracer.after_stage(path="stages[0]", outputs={}, elapsed=0.1, usage=usage)
    tracer.before_stage(path="stages[1]", stage=object(), inputs={})
    tracer.on_stage_error(path="stages[1]", error=ValueError("x"), elapsed=0.1, usage={"lm_calls": 1})
    tracer.before_stage(path="stages[2]", stage=object(), inputs={})
    tracer.after_stage(path="stages[2]", outputs={}, elapsed=0.1)
    end, error, plain = tracer.events[1], tracer.events[3], tracer.events[5]
    assert end["usage"] == usage
    assert error["usage"] == {"lm_calls": 1}
    assert "usage" not in plain
    assert [e["span"] for e in tracer.events] == [1, 1, 2, 2, 3, 3]


def test_tracing_pipeline_saves_graph_and_report(tmp_path: Path) -> None:
    p = stageflow.TracingPipeline([fn("a", ["x"], ["y"])])
    p(x=1)
    doc = json.loads(p.save_trace(tmp_path / "t.json").read_text(encoding="utf-8"))
    assert doc["graphs"]["g1"]["title"] == "TracingPipeline"
    with stageflow.trace() as tracer:
        p(x=2)
    html = tracer.save_report(tmp_path / "r.html").read_text(encoding="utf-8")
    assert "stages[0]" in html
    assert "TracingPipeline" in html
