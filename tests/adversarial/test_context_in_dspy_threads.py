"""stageflow's context (limits, profile, trace, hooks) holds inside DSPy's own worker threads.

Reproducer (issue 9): ``limits(2)`` around a 6-thread ``dspy.Evaluate`` allowed 6 concurrent calls and
``profile()`` recorded nothing, because Python does not copy context variables into pool threads.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import dspy
import pytest

import stageflow


class Gauge:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0

    def stage(self, question: str) -> dict[str, str]:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.02)
        with self.lock:
            self.active -= 1
        return {"answer": question}


def devset(n: int = 12) -> list[Any]:
    return [dspy.Example(question=f"q{i}", answer=f"q{i}").with_inputs("question") for i in range(n)]


def evaluate(program: Any, threads: int = 6) -> float:
    ev = dspy.Evaluate(
        devset=devset(),
        metric=lambda e, p, t=None: e.answer == p.answer,
        num_threads=threads,
        display_progress=False,
    )
    return float(ev(program).score)


def test_limits_hold_inside_dspy_evaluate_threads() -> None:
    gauge = Gauge()
    program = stageflow.SequentialPipeline([stageflow.stage(gauge.stage, writes=["answer"])])
    with stageflow.limits(2):
        assert evaluate(program) == 100.0
    assert gauge.peak == 2


def test_limits_do_not_leak_into_later_work_on_the_same_worker_threads() -> None:
    barrier = threading.Barrier(3, timeout=10)

    def meet(question: str) -> dict[str, str]:
        barrier.wait()  # three calls at once, or BrokenBarrierError
        return {"answer": question}

    program = stageflow.SequentialPipeline([stageflow.stage(meet, writes=["answer"])])
    with stageflow.limits(1):
        pass
    ev = dspy.Evaluate(
        devset=devset(3),
        metric=lambda e, p, t=None: e.answer == p.answer,
        num_threads=3,
        display_progress=False,
    )
    assert ev(program).score == 100.0


def test_profile_and_trace_record_runs_made_by_dspy_evaluate_threads() -> None:
    program = stageflow.SequentialPipeline(
        [stageflow.stage(lambda question: {"answer": question}, writes=["answer"])]
    )
    with stageflow.profile() as prof, stageflow.trace() as tracer:
        assert evaluate(program) == 100.0
    assert prof.runs == 12
    assert sum(e["event"] == "stage_start" for e in tracer.events) == 12
    assert sum(e["event"] == "output" for e in tracer.events) == 12


def test_hooks_see_pipelines_run_by_dspy_parallel() -> None:
    seen: list[str] = []
    lock = threading.Lock()

    class Hook:
        def after_stage(self, *, path: str, **_: Any) -> None:
            with lock:
                seen.append(path)

    program = stageflow.SequentialPipeline(
        [stageflow.stage(lambda question: {"answer": question}, writes=["answer"])]
    )
    parallel = dspy.Parallel(num_threads=4, disable_progress_bar=True)
    with stageflow.attach_hooks(Hook()):
        results = parallel([(program, {"question": f"q{i}"}) for i in range(8)])
    assert [r.answer for r in results] == [f"q{i}" for i in range(8)]
    assert len(seen) == 8


@pytest.mark.parametrize("threads", [1, 4])
def test_a_cap_set_inside_the_worker_thread_still_applies(threads: int) -> None:
    gauge = Gauge()
    inner = stageflow.ForEach(
        stageflow.stage(gauge.stage, writes=["answer"]), over="questions", item="question"
    )

    def run(questions: list[str]) -> Any:
        with stageflow.limits(1):
            return inner(questions=questions)

    parallel = dspy.Parallel(num_threads=threads, disable_progress_bar=True)
    parallel([(run, {"questions": ["a", "b", "c"]})])
    assert gauge.peak == 1
