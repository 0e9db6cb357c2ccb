"""Traces record the program's fingerprint (issue 9): two traces with the same fingerprint come
from the same program; an edit (a demo) changes it."""

from __future__ import annotations

import json
from pathlib import Path

import dspy

import stageflow
from stageflow.testing import FakeLM, call


def program() -> stageflow.SequentialPipeline:
    return stageflow.SequentialPipeline(
        [dspy.Predict("question -> answer"), stageflow.stage(lambda answer: {"n": len(answer)}, writes=["n"])]
    )


async def test_the_outermost_run_records_the_fingerprint(mode: str, tmp_path: Path) -> None:
    p = program()
    with dspy.context(lm=FakeLM({"answer": "abc"})), stageflow.trace() as tracer:
        await call(p, mode, question="q")
        p.stages[0].demos = [dspy.Example(question="x", answer="y")]
        await call(p, mode, question="q")
        now = stageflow.fingerprint(p)  # the fingerprint covers the LM in use, so ask inside the context
    starts = [e for e in tracer.events if e["event"] == "input"]
    assert starts[0]["fingerprint"] != starts[1]["fingerprint"]
    assert starts[1]["fingerprint"] == now
    tracer.save(tmp_path / "t.json")
    saved = json.loads((tmp_path / "t.json").read_text(encoding="utf-8"))
    events = saved["events"] if isinstance(saved, dict) else saved
    assert [e["fingerprint"] for e in events if e["event"] == "input"][1] == now


def test_nested_runs_do_not_repeat_it() -> None:
    inner = program()
    outer = stageflow.SequentialPipeline([inner])
    with dspy.context(lm=FakeLM({"answer": "abc"})), stageflow.trace() as tracer:
        outer(question="q")
    starts = [e for e in tracer.events if e["event"] == "input"]
    assert [("fingerprint" in e) for e in starts] == [True, False]
