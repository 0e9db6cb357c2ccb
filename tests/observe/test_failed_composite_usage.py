"""A nested pipeline or fan-out that failed still reports what its stages used before it failed:
its row in a profile, the profile's totals and its trace event carry it (before, its row and the
totals counted none of it: 0 LM calls for a ForEach whose items had made 3)."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow.testing import FakeLM, call


class Item(dspy.Module):  # type: ignore[misc]
    """Answers its sub-question (one LM call), then fails for ``"bad"``."""

    def __init__(self) -> None:
        super().__init__()
        self.p = dspy.Predict("sub_question -> fact")

    def forward(self, sub_question: str) -> Any:
        fact = self.p(sub_question=sub_question).fact
        if sub_question == "bad":
            raise ValueError("bad item")
        return dspy.Prediction(fact=fact)


def _program(nested: bool) -> Any:
    fan_out = stageflow.ForEach(Item(), over="sub_questions", collect="facts", max_concurrency=1)
    inner = stageflow.SequentialPipeline([fan_out]) if nested else fan_out
    return stageflow.SequentialPipeline([dspy.Predict("question -> sub_questions: list[str]"), inner])


@pytest.mark.parametrize("nested", [False, True], ids=["fan-out", "pipeline-around-fan-out"])
async def test_a_failed_nested_stage_reports_its_stages_usage(mode: str, nested: bool) -> None:
    lm = FakeLM({"sub_questions": ["a", "b", "bad"], "fact": "F"})
    with (
        dspy.context(lm=lm),
        stageflow.profile() as prof,
        stageflow.trace() as tracer,
        pytest.raises(stageflow.StageError, match="bad item"),
    ):
        await call(_program(nested), mode, question="q")
    assert lm.calls == 4
    rows = {path: row["lm_calls"] for path, row in prof.get_performance_summary().items()}
    assert rows["stages[0]"] == 1
    assert rows["stages[1]"] == 3  # the three items' calls, the failed one's included
    assert prof.to_dict()["totals"]["lm_calls"] == 4
    last = prof.last_run
    assert last is not None
    assert last.usage.lm_calls == 4
    failed = [e for e in tracer.events if e.get("event") == "stage_error" and e.get("stage") == "stages[1]"]
    assert len(failed) == 1
    assert failed[0]["usage"]["lm_calls"] == 3
