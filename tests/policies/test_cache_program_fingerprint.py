"""``stageflow.fingerprint(program)`` over whole programs: every pattern, every kind of stage."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import dspy
import pytest

import stageflow
from stageflow import (
    BranchingPipeline,
    ForEach,
    IterativePipeline,
    ProfilingPipeline,
    SequentialPipeline,
    Stage,
    TracingPipeline,
)
from stageflow.testing import FakeLM

fp = stageflow.fingerprint


def branching(route: str = "a", answer: str = "A") -> BranchingPipeline:
    return BranchingPipeline(
        lambda question: route,
        {
            "a": Stage(lambda question: {"answer": answer}, writes=["answer"]),
            "b": dspy.Predict("question -> answer"),
        },
    )


def looping(threshold: int = 3, limit: int = 5) -> IterativePipeline:
    return IterativePipeline(
        [Stage(lambda n: {"n": n + 1}, writes=["n"])],
        lambda state, i: state["n"] >= threshold,
        max_iterations=limit,
    )


def mapping(scale: int = 2) -> SequentialPipeline:
    return SequentialPipeline(
        [ForEach(Stage(lambda item: {"y": item * scale}, writes=["y"]), over="xs", item="item", collect="y")]
    )


BUILDERS: list[tuple[str, Callable[..., Any], dict[str, Any]]] = [
    ("router", branching, {"route": "b"}),
    ("branch body", branching, {"answer": "B"}),
    ("stopping condition", looping, {"threshold": 4}),
    ("loop limit", looping, {"limit": 6}),
    ("mapped stage", mapping, {"scale": 3}),
]


@pytest.mark.parametrize(("what", "build", "change"), BUILDERS, ids=[b[0] for b in BUILDERS])
def test_every_part_of_a_pattern_is_covered(
    what: str, build: Callable[..., Any], change: dict[str, Any]
) -> None:
    assert fp(build()) == fp(build()), what
    assert fp(build(**change)) != fp(build()), what


def test_policies_that_change_outputs_are_covered_and_caches_are_not() -> None:
    def build(default: str, cache: Any) -> SequentialPipeline:
        return SequentialPipeline(
            [Stage(lambda q: {"a": q}, writes=["a"], fallback={"a": default}, cache=cache)]
        )

    assert fp(build("x", True)) != fp(build("y", True))  # the fallback's output
    assert fp(build("x", True)) == fp(build("x", 10))  # the cache itself is not behaviour


def test_running_or_observing_a_program_does_not_change_it() -> None:
    lm = FakeLM({"answer": "A"})
    programs = [
        ProfilingPipeline([dspy.Predict("question -> answer")]),
        TracingPipeline([dspy.Predict("question -> answer")]),
        SequentialPipeline([stageflow.CachedStage(dspy.Predict("question -> answer"))]),
    ]
    with dspy.context(lm=lm):
        for program in programs:
            before = fp(program)
            program(question="q")
            program(question="r")
            assert fp(program) == before, type(program).__name__


def test_the_context_lm_is_part_of_a_predictors_fingerprint() -> None:
    program = SequentialPipeline([dspy.Predict("question -> answer")])
    with dspy.context(lm=FakeLM({}, model="fake/a")):
        a = fp(program)
    with dspy.context(lm=FakeLM({}, model="fake/b")):
        b = fp(program)
    with dspy.context(lm=FakeLM({}, model="fake/a")):
        a_again = fp(program)
    assert a != b
    assert a == a_again  # another LM object with the same model and settings


def test_helpers_a_function_calls_are_covered() -> None:
    def helper(x: int) -> int:
        return x * 2

    def body(x: int) -> dict[str, int]:
        return {"y": helper(x)}

    program = SequentialPipeline([Stage(body, writes=["y"])])
    before = fp(program)
    helper.__code__ = (lambda x: x * 3).__code__
    # body reads ``helper`` from its closure: the helper's new code is a new fingerprint
    assert fp(program) != before


def test_a_recursive_function_and_a_self_referencing_object_terminate() -> None:
    def fact(n: int) -> int:
        return 1 if n <= 1 else n * fact(n - 1)

    class Node:
        def __init__(self) -> None:
            self.me = self

        def __call__(self, x: int) -> dict[str, int]:
            return {"y": fact(x)}

    program = SequentialPipeline([Stage(Node(), reads=["x"], writes=["y"])])
    assert fp(program) == fp(program)
    assert program(x=4).y == 24


def test_a_huge_captured_container_is_sampled_not_walked() -> None:
    big = list(range(1_000_000))
    program = SequentialPipeline([Stage(lambda i: {"y": big[i]}, writes=["y"])])
    assert fp(program) == fp(program)


def test_fingerprints_agree_across_threads() -> None:
    program = SequentialPipeline(
        [dspy.Predict("question -> answer"), Stage(lambda answer: {"n": 1}, writes=["n"])]
    )
    seen: list[str] = []
    lock = threading.Lock()

    def work() -> None:
        for _ in range(50):
            value = fp(program)
            with lock:
                seen.append(value)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(seen)) == 1
    assert len(seen) == 400
