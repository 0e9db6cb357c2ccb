"""A value whose ``repr`` raises never costs the trace its events (second attack round).

Reproducer: a stage output whose ``__repr__`` raised made the tracer's hook fail (logged only): the
trace kept ``input`` and ``stage_start`` but lost the stage's end and the run's output, so it showed
a stage that started and never ended.
"""

from __future__ import annotations

import json
from typing import Any

import stageflow
from stageflow.testing import call


class BadRepr:
    def __repr__(self) -> str:
        raise RuntimeError("repr boom")


async def test_the_trace_keeps_every_event_with_a_placeholder(mode: str, tmp_path: Any) -> None:
    tracer = stageflow.Tracer()
    pipeline = stageflow.SequentialPipeline([stageflow.Stage(lambda x: {"y": BadRepr()}, writes=["y"])])
    with stageflow.attach_hooks(tracer):
        result = await call(pipeline, mode, x=1)
    assert isinstance(result.y, BadRepr)
    kinds = [e["event"] for e in tracer.to_dict()["events"]]
    assert kinds == ["input", "stage_start", "stage_end", "output"]
    tracer.save(tmp_path / "t.json")
    assert "repr raised RuntimeError" in json.dumps(json.loads((tmp_path / "t.json").read_text()))
