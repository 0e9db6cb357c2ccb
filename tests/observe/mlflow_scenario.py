"""Run in a subprocess by ``test_otel_integrations``: MLflow's DSPy autologging and stageflow's spans.

Usage: ``python mlflow_scenario.py DIR`` with ``MLFLOW_USE_DEFAULT_TRACER_PROVIDER=false`` (MLflow
then shares the global OpenTelemetry provider and context with other instrumentation). Prints one
JSON line per mode (sync, async): the spans of that call's MLflow trace, read back from the SQLite
tracking store.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import dspy
import mlflow
import mlflow.dspy

import stageflow
from stageflow.observe import otel
from stageflow.testing import FakeLM


def program() -> stageflow.SequentialPipeline:
    return stageflow.SequentialPipeline(
        [
            dspy.Predict("question -> sub_questions: list[str]"),
            stageflow.ForEach(dspy.Predict("sub_question -> fact"), over="sub_questions", collect="facts"),
            stageflow.stage(lambda facts: {"n": len(facts)}, writes=["n"], name="count"),
        ]
    )


def spans_of_last_trace() -> list[dict[str, Any]]:
    trace = mlflow.get_trace(mlflow.get_last_active_trace_id())
    assert trace is not None, "MLflow recorded no trace"
    return [
        {
            "name": s.name,
            "id": s.span_id,
            "parent": s.parent_id,
            "trace": s.trace_id,
            "type": s.span_type,
            "path": s.get_attribute("stageflow.stage.path"),
            "kind": s.get_attribute("openinference.span.kind"),
        }
        for s in trace.data.spans
    ]


def main(directory: str) -> None:
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    mlflow.set_tracking_uri(f"sqlite:///{directory}/mlflow.db")
    mlflow.set_experiment("stageflow")
    mlflow.dspy.autolog()
    # MLflow sets up its tracer provider lazily; this hands it to stageflow (and initialises it).
    hook = otel.instrument(tracer_provider=mlflow.tracing.get_bridged_tracer_provider())
    assert hook is not None
    lm = FakeLM({"sub_questions": ["a", "b", "c", "d"], "fact": "F"}, latency=0.002)
    pipeline = program()
    with dspy.context(lm=lm):
        pipeline(question="q")
        print(json.dumps({"mode": "sync", "lm_calls": lm.calls, "spans": spans_of_last_trace()}), flush=True)
        lm.calls = 0
        asyncio.run(pipeline.acall(question="q"))
        print(json.dumps({"mode": "async", "lm_calls": lm.calls, "spans": spans_of_last_trace()}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
