"""A budget holds inside DSPy's own worker threads (dspy.Evaluate, dspy.Parallel), with or without a
stageflow pipeline in between."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

import stageflow
from stageflow.testing import FakeLM


def devset(n: int) -> list[Any]:
    return [dspy.Example(question=f"q{i}", answer="ok").with_inputs("question") for i in range(n)]


def evaluate(program: Any, n: int = 20, threads: int = 8) -> Any:
    ev = dspy.Evaluate(
        devset=devset(n),
        metric=lambda e, p, t=None: p is not None and e.answer == p.answer,
        num_threads=threads,
        display_progress=False,
        max_errors=10_000,
    )
    return ev(program)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare-predict", "pipeline"])
def test_budget_holds_inside_dspy_evaluate_threads(wrapped: bool) -> None:
    lm = FakeLM(latency=0.002)
    program: Any = dspy.Predict("question -> answer")
    if wrapped:
        program = stageflow.SequentialPipeline([program])
    with dspy.context(lm=lm), stageflow.budget(max_calls=7) as spent:
        result = evaluate(program)
    assert spent.calls == 7 == lm.calls
    assert result.score == pytest.approx(35.0)  # 7 of 20 answered, the rest refused
    assert spent.refused == 13
    assert spent.reserved_calls == 0


def test_a_run_budget_holds_for_a_parallel_inside_a_stage() -> None:
    lm = FakeLM(latency=0.002)
    qa = dspy.Predict("question -> answer")

    def fan(questions: list[str]) -> dict[str, Any]:
        parallel = dspy.Parallel(num_threads=4, disable_progress_bar=True, max_errors=100)
        out = parallel([(qa, {"question": q}) for q in questions])
        return {"answers": [o.answer if o is not None else None for o in out]}

    pipe = stageflow.SequentialPipeline([stageflow.stage(fan, writes=["answers"])]).set_budget(max_calls=3)
    with dspy.context(lm=lm):
        result = pipe(questions=[f"q{i}" for i in range(10)])
    assert lm.calls == 3
    assert sum(a == "ok" for a in result.answers) == 3


def test_the_budget_is_gone_from_worker_threads_after_the_block() -> None:
    lm = FakeLM()
    with dspy.context(lm=lm):
        with stageflow.budget(max_calls=0):
            pass
        result = evaluate(dspy.Predict("question -> answer"), n=6, threads=3)
    assert result.score == 100.0
    assert lm.calls == 6
