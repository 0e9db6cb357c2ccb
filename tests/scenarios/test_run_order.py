"""Run-order scenarios: pipeline, inputs, expected outputs and the order stages were called.

A table in the spirit of Haystack's pipeline run tests (and LangGraph's and Burr's behaviour
suites): each row builds a pipeline of recording stages, runs it sync and async, and compares the
outputs and the call order. A set in the expected order means "these, in any order" (concurrent
stages).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

import stageflow
from stageflow import (
    BranchingPipeline,
    EnsemblePipeline,
    ErrorHandlingPipeline,
    Fallback,
    ForEach,
    IterativePipeline,
    ParallelPipeline,
    ResultAggregator,
    RoutingError,
    SequentialPipeline,
    Stage,
)
from stageflow.testing import call

Log = list[str]


def rec(
    log: Log, name: str, reads: Sequence[str], writes: Sequence[str], fn: Callable[..., dict[str, Any]]
) -> Stage:
    """A stage called ``name`` that reads ``reads``, logs its call and returns ``fn(**inputs)``."""

    def run(**inputs: Any) -> dict[str, Any]:
        log.append(name)
        return fn(**inputs)

    run.__name__ = name
    return Stage(run, reads=list(reads), writes=list(writes))


@dataclass
class Scenario:
    name: str
    build: Callable[[Log], Any]
    inputs: dict[str, Any]
    outputs: dict[str, Any] | type[BaseException]
    order: list[str | frozenset[str]]


def linear(log: Log) -> Any:
    return SequentialPipeline(
        [
            rec(log, "a", ["x"], ["y"], lambda x: {"y": x + 1}),
            rec(log, "b", ["y"], ["z"], lambda y: {"z": y * 10}),
            rec(log, "c", ["x", "z"], ["total"], lambda x, z: {"total": x + z}),
        ]
    )


def last_writer_wins(log: Log) -> Any:
    return SequentialPipeline(
        [
            rec(log, "first", ["x"], ["y"], lambda x: {"y": "first"}),
            rec(log, "second", ["x"], ["y"], lambda x: {"y": "second"}),
        ]
    )


def branch(log: Log) -> Any:
    def route(task: str) -> str:
        log.append("route")
        return task

    return BranchingPipeline(
        route,
        {
            "a": rec(log, "branch_a", ["text"], ["out"], lambda text: {"out": "A:" + text}),
            "b": rec(log, "branch_b", ["text"], ["out"], lambda text: {"out": "B:" + text}),
        },
    )


def branch_then_join(log: Log) -> Any:
    return SequentialPipeline(
        [branch(log), rec(log, "join", ["out"], ["final"], lambda out: {"final": out.lower()})]
    )


def loop(log: Log) -> Any:
    return IterativePipeline(
        [rec(log, "inc", ["n"], ["n"], lambda n: {"n": n + 1})],
        stopping_condition=lambda state, iteration: state["n"] >= 3,
        max_iterations=10,
    )


def loop_limit(log: Log) -> Any:
    return IterativePipeline(
        [rec(log, "inc", ["n"], ["n"], lambda n: {"n": n + 1})],
        stopping_condition=lambda state, iteration: False,
        max_iterations=2,
    )


def parallel_then_join(log: Log) -> Any:
    return SequentialPipeline(
        [
            ParallelPipeline(
                [
                    [
                        rec(log, "left", ["x"], ["l"], lambda x: {"l": x + 1}),
                        rec(log, "right", ["x"], ["r"], lambda x: {"r": x + 2}),
                    ]
                ]
            ),
            rec(log, "join", ["l", "r"], ["sum"], lambda l, r: {"sum": l + r}),  # noqa: E741
        ]
    )


def foreach(log: Log) -> Any:
    return ForEach(
        rec(log, "square", ["x"], ["y"], lambda x: {"y": x * x}), over="numbers", item="x", collect="y"
    )


def nested(log: Log) -> Any:
    inner = SequentialPipeline([rec(log, "inner_a", ["x"], ["y"], lambda x: {"y": x + 1})])
    return SequentialPipeline(
        [
            rec(log, "before", ["x"], ["x"], lambda x: {"x": x * 2}),
            inner,
            rec(log, "after", ["y"], ["z"], lambda y: {"z": y}),
        ]
    )


def recovered(log: Log) -> Any:
    def fail(x: int) -> dict[str, Any]:
        log.append("fail")
        raise ValueError("boom")

    def recover(error: Exception, state: dict[str, Any]) -> dict[str, Any]:
        log.append("recover")
        return {"y": -1}

    return ErrorHandlingPipeline(
        [
            rec(log, "a", ["x"], ["x"], lambda x: {"x": x}),
            Stage(fail, writes=["y"]),
            rec(log, "c", ["y"], ["z"], lambda y: {"z": y}),
        ],
        recovery_strategies={1: recover},
    )


def fallback(log: Log) -> Any:
    def fail(x: int) -> dict[str, Any]:
        log.append("fail")
        raise ValueError("boom")

    return SequentialPipeline(
        [
            Stage(fail, writes=["y"], fallback=Fallback(default={"y": 0})),
            rec(log, "c", ["y"], ["z"], lambda y: {"z": y + 1}),
        ]
    )


def ensemble(log: Log) -> Any:
    return EnsemblePipeline(
        [
            rec(
                log,
                "m1",
                ["text"],
                ["answer", "confidence"],
                lambda text: {"answer": "yes", "confidence": 0.9},
            ),
            rec(
                log,
                "m2",
                ["text"],
                ["answer", "confidence"],
                lambda text: {"answer": "yes", "confidence": 0.6},
            ),
            rec(
                log,
                "m3",
                ["text"],
                ["answer", "confidence"],
                lambda text: {"answer": "no", "confidence": 0.7},
            ),
        ],
        ResultAggregator("majority"),
    )


def unknown_route(log: Log) -> Any:
    return BranchingPipeline(
        lambda task: "c", {"a": rec(log, "branch_a", ["task"], ["out"], lambda task: {"out": 1})}
    )


def default_argument(log: Log) -> Any:
    def greet(name: str, greeting: str = "hello") -> dict[str, str]:
        log.append("greet")
        return {"text": f"{greeting} {name}"}

    return SequentialPipeline([greet])


SCENARIOS = [
    Scenario("linear", linear, {"x": 1}, {"y": 2, "z": 20, "total": 21}, ["a", "b", "c"]),
    Scenario("last writer wins", last_writer_wins, {"x": 1}, {"y": "second"}, ["first", "second"]),
    Scenario("branch a", branch, {"task": "a", "text": "t"}, {"out": "A:t"}, ["route", "branch_a"]),
    Scenario(
        "branch b then join",
        branch_then_join,
        {"task": "b", "text": "T"},
        {"final": "b:t"},
        ["route", "branch_b", "join"],
    ),
    Scenario("unknown route", unknown_route, {"task": "x"}, RoutingError, []),
    Scenario("loop until condition", loop, {"n": 0}, {"n": 3}, ["inc", "inc", "inc"]),
    Scenario("loop hits its limit", loop_limit, {"n": 0}, {"n": 2}, ["inc", "inc"]),
    Scenario(
        "parallel then join",
        parallel_then_join,
        {"x": 1},
        {"l": 2, "r": 3, "sum": 5},
        [frozenset({"left", "right"}), "join"],
    ),
    Scenario(
        "for each, in input order",
        foreach,
        {"numbers": [3, 1, 2]},
        {"y": [9, 1, 4]},
        ["square", "square", "square"],
    ),
    Scenario("nested pipeline", nested, {"x": 2}, {"x": 4, "y": 5, "z": 5}, ["before", "inner_a", "after"]),
    Scenario("recovery strategy", recovered, {"x": 1}, {"y": -1, "z": -1}, ["a", "fail", "recover", "c"]),
    Scenario("fallback default", fallback, {"x": 1}, {"y": 0, "z": 1}, ["fail", "c"]),
    Scenario(
        "ensemble majority", ensemble, {"text": "q"}, {"answer": "yes"}, [frozenset({"m1", "m2", "m3"})]
    ),
    Scenario("parameter default", default_argument, {"name": "Ada"}, {"text": "hello Ada"}, ["greet"]),
    Scenario(
        "caller overrides default",
        default_argument,
        {"name": "Ada", "greeting": "hi"},
        {"text": "hi Ada"},
        ["greet"],
    ),
]


def _matches(log: Log, order: list[str | frozenset[str]]) -> bool:
    """``log`` follows ``order``: names in sequence, a set = its members (any order, any count ≥ 1)."""
    i = 0
    for step in order:
        if isinstance(step, str):
            if i >= len(log) or log[i] != step:
                return False
            i += 1
        else:
            start = i
            while i < len(log) and log[i] in step:
                i += 1
            if set(log[start:i]) != set(step):
                return False
    return i == len(log)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_run_order(scenario: Scenario, mode: str) -> None:
    log: Log = []
    pipeline = scenario.build(log)
    log.clear()  # building may probe stages; only the run counts
    if isinstance(scenario.outputs, type):
        with pytest.raises(scenario.outputs):
            await call(pipeline, mode, **scenario.inputs)
    else:
        result = await call(pipeline, mode, **scenario.inputs)
        got = {k: result[k] for k in scenario.outputs}
        assert got == scenario.outputs
    assert _matches(log, scenario.order), log


def test_the_order_matcher_rejects_wrong_orders() -> None:
    assert _matches(["a", "b"], ["a", "b"])
    assert not _matches(["b", "a"], ["a", "b"])
    assert not _matches(["a"], ["a", "b"])
    assert _matches(["r", "l", "j"], [frozenset({"l", "r"}), "j"])
    assert not _matches(["l", "j"], [frozenset({"l", "r"}), "j"])


def test_a_stage_renaming_its_input_follows_the_hint() -> None:
    def answer(query: str) -> dict[str, str]:
        return {"answer": query.upper()}

    broken = SequentialPipeline([Stage(answer, inputs={"query": "question"}, writes=["answer"])])
    with pytest.raises(stageflow.ContractError) as info:
        broken(text="hi")
    hint = info.value.hint or ""
    assert "inputs={'query': 'text'}" in hint  # the stage's parameter, fed from the available field
    fixed = SequentialPipeline([Stage(answer, inputs={"query": "text"}, writes=["answer"])])
    assert fixed(text="hi").answer == "HI"


async def test_writes_on_a_wrapped_nested_pipeline_limits_what_it_merges(mode: str) -> None:
    inner = SequentialPipeline(
        [
            stageflow.stage(lambda x: {"x": x + 100}, writes=["x"]),  # scratch work on the caller's x
            stageflow.stage(lambda x: {"answer": x}, writes=["answer"]),
        ]
    )
    outer = SequentialPipeline([Stage(inner, writes=["answer"])])
    result = await call(outer, mode, x=1)
    assert (result.x, result.answer) == (1, 101)
    assert set(outer.check(["x"])) == {"x", "answer"}


async def test_a_function_router_wrapped_in_stage_works_like_a_bare_one(mode: str) -> None:
    def route(kind: str) -> str:
        return kind

    branches = {
        "a": stageflow.stage(lambda task: {"out": "A"}, writes=["out"]),
        "b": stageflow.stage(lambda task: {"out": "B"}, writes=["out"]),
    }
    wrapped = BranchingPipeline(Stage(route, inputs={"kind": "task"}), branches)
    bare = BranchingPipeline(lambda task: task, dict(branches))
    assert (await call(wrapped, mode, task="b")).out == (await call(bare, mode, task="b")).out == "B"


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (lambda e, s: {"y": "recovered"}, ("recovered", "recovered")),  # recovery first, as the tutorial
        (lambda e, s: None, ("skipped", None)),  # not recovered: a non-critical error is skipped
    ],
    ids=["recovers", "falsy-then-skip"],
)
async def test_a_non_critical_error_tries_the_recovery_strategy_first(
    strategy: Any, expected: tuple[str, Any], mode: str
) -> None:
    def slow(x: int) -> dict[str, Any]:
        raise TimeoutError("no answer")  # non-critical by default

    p = ErrorHandlingPipeline([Stage(slow, writes=["y"])], recovery_strategies={0: strategy})
    result = await call(p, mode, x=1)
    assert [e.kind for e in result.run.events][-1] == expected[0]
    assert result.get("y") == expected[1]


async def test_a_raising_recovery_strategy_fails_even_for_a_non_critical_error(mode: str) -> None:
    def slow(x: int) -> dict[str, Any]:
        raise TimeoutError("no answer")

    def broken(error: Exception, state: dict[str, Any]) -> dict[str, Any]:
        raise KeyError("cache down")

    p = ErrorHandlingPipeline([Stage(slow, writes=["y"])], recovery_strategies={0: broken})
    with pytest.raises(stageflow.PipelineError) as info:
        await call(p, mode, x=1)
    assert isinstance(info.value.__cause__, KeyError)
    assert "cache down" in str(info.value)
